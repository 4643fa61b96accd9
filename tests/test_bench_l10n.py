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
