"""The l10n benchmark scripts' own logic on tiny data: the learning curve scores every checkpoint as
validation during training does, and the frontier's held-out Finnish dev set is what it claims."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .test_adaptation import make_l10n, make_run

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_curve_scores_each_checkpoint_like_validation_in_training(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_l10n(tmp_path / "l10n")
    run = make_run(root, tmp_path / "run", "task.dev_languages=[xa]", "task.dev_budget='100'", "task.dev_finetune_steps=2",
                   "task.dev_finetune_tokens=60", "task.dev_max_segments=6", "task.dev_metric=loss", "train.steps=4",
                   "train.save_every=2", "train.keep_checkpoints=0", "train.eval_every=4", "train.trackers=[]")
    curve = bench_module("l10n_learning_curve", monkeypatch)
    out = tmp_path / "curve"
    monkeypatch.setattr(sys, "argv", ["l10n_learning_curve.py", str(run), "--name", str(out)])
    curve.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in result["rows"]] == [2, 4] and out.with_suffix(".png").is_file()
    in_training = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()
                   if '"validation"' in line][-1]
    last = result["rows"][-1]
    assert in_training["step"] == 4
    for key in ("dev_loss", "dev_loss_zero_shot", "dev_chrf", "dev_bleu"):
        assert last[key] == pytest.approx(in_training[key], abs=1e-4)  # the checkpoint's weights, scored the same way
    assert result["rows"][0]["pairs_seen"] < last["pairs_seen"]
    # a rerun scores nothing again: both points are cached in the results file
    monkeypatch.setattr(curve, "score_checkpoint", lambda *a: pytest.fail("scored a cached checkpoint"))
    curve.main()


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("lang\tsrc\ten\torigin\n" + "".join(f"fi\t{s}\t{e}\tt\n" for s, e in rows))


def test_frontier_dev_set_is_the_last_pool_pairs_outside_every_budget(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    frontier = bench_module("l10n_frontier", monkeypatch)
    pool = [(f'lause "{i}"', f'sentence "{i}"') for i in range(30)]  # quotes are ordinary characters
    _write(tmp_path / "finetune" / "fi.pool.tsv.gz", pool)
    _write(tmp_path / "finetune" / "fi.40k.tsv.gz", pool[:10] + pool[25:])  # the budget takes a few of the last too
    dev = frontier.held_out_dev(tmp_path, tmp_path / "out" / "fi_dev.tsv.gz", size=8)
    with gzip.open(dev, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [(r["src"], r["en"]) for r in rows] == pool[17:25]
    with pytest.raises(SystemExit, match="only 15 pairs"):
        frontier.held_out_dev(tmp_path, tmp_path / "out" / "big.tsv.gz", size=16)


def test_frontier_recipe_rows_merge_into_meta_recipes_by_recipe_budget_and_preset(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = bench_module("l10n_frontier_recipes", monkeypatch)
    report = tmp_path / "dev" / "emb"
    report.mkdir(parents=True)
    base = {"lang": "ro", "init_pairs": "130000", "init_seconds": "1300", "p_bleu": "", "p_chrf": "", "p_nll": ""}
    cells = [{**base, "init": "frontier_fomaml", "budget": "1k", "seed": s, "bleu": b, "chrf": "30", "nll": n,
              "p_nll": "0.02", "nll_at_0": "4", "nll_at_100": "3.5", "chrf_at_0": "20", "chrf_at_100": "29"}
             for s, b, n in ((0, "6", "3.2"), (1, "8", "3.4"))]
    cells.append({**base, "init": "frontier_multitask", "budget": "1k", "seed": 0, "bleu": "5", "chrf": "28", "nll": "3.5"})
    with (report / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for c in cells for k in c}))
        writer.writeheader()
        writer.writerows(cells)
    rows = recipes.csv_rows(report, "emb", {"frontier_fomaml": 1500.0})
    fomaml = next(r for r in rows if r["recipe"] == "frontier_fomaml")
    assert (fomaml["dev_bleu"], fomaml["dev_nll"], fomaml["n_seeds"], fomaml["finetune"]) == ("7.0000", "3.3000", 2, "emb")
    assert (fomaml["nll_at_100"], fomaml["chrf_at_0"], fomaml["nll_at_10"], fomaml["seconds"]) == ("3.5000", "20.0000", "", "1500.0")
    assert fomaml["algo"] == "fomaml+sio" and fomaml["p_nll"] == "0.02"
    multi = next(r for r in rows if r["recipe"] == "frontier_multitask")
    assert multi["seconds"] == "1300.0" and multi["nll_at_0"] == ""  # no curve for that cell: blank, not zero

    path = tmp_path / "meta_recipes.csv"
    old = {"recipe": "warm_multitask", "algo": "multitask", "dev_nll": "4.18"}  # a row from before the new columns
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old))
        writer.writeheader()
        writer.writerow(old)
    recipes.write_rows(path, rows)
    recipes.write_rows(path, [{**fomaml, "dev_nll": "3.1"}])  # a rerun of one cell replaces its row only
    merged = list(csv.DictReader(path.open()))
    assert list(merged[0]) == recipes.COLUMNS
    assert [(r["recipe"], r["budget"], r["finetune"], r["dev_nll"]) for r in merged] == [
        ("warm_multitask", "", "", "4.18"), ("frontier_fomaml", "1k", "emb", "3.1"), ("frontier_multitask", "1k", "emb", "3.5000")]
