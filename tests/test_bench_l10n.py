"""The l10n benchmark scripts' own logic on tiny data: the frontier's held-out Finnish dev set is what
it claims and its scoring modes pick the checkpoints they say, the fine-tuning speed benchmark times
both loops, and the README's tables print from the committed results."""

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


def test_frontier_rule_scores_the_checkpoint_at_the_configs_steps_beside_the_earlier_scores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--fine-tune rule`` on a run resumed past the config's 2,000 updates: no training, the
    checkpoint at 2,000 is scored with the Romanian rule, and the early-stopped scores stay."""
    import sys

    import metanmt.engine.checkpoint as ckpt

    frontier = bench_module("l10n_frontier", monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "frontier.json"
    snapshot = runs / "multi_at_2000"
    snapshot.mkdir(parents=True)
    (snapshot / "trainer_state.json").write_text(json.dumps({"step": 2000, "seconds": 1297.0, "examples_seen": 129555,
                                                             "tokens_seen": 1556988}))
    out.write_text(json.dumps({"fi16k": {"bleu": 3.54}, "at_pairs": {"updates": 3250}, "threads": "2"}))
    monkeypatch.setattr(ckpt, "latest_trainer_state", lambda run: {"step": 10250})
    monkeypatch.setattr(frontier, "exported", lambda r, step: snapshot if step == 2000 else pytest.fail(f"step {step}"))
    monkeypatch.setattr(frontier, "metanmt", lambda *a: pytest.fail(f"ran metanmt {a}"))
    scored = []

    def finnish_16k(init, where, data_root, runs_, seeds, fine_tune):
        scored.append((init, where.name, fine_tune))
        return {"bleu": 7.0, "chrf": 26.0, "nll": 3.5}

    monkeypatch.setattr(frontier, "finnish_16k", finnish_16k)
    monkeypatch.setattr(sys, "argv", ["l10n_frontier.py", "--data-root", str(tmp_path), "--runs", str(runs),
                                      "--out", str(out), "--fine-tune", "rule", "--seeds", "1"])
    frontier.main()
    assert scored == [(snapshot, "compare_rule", "rule")]
    result = json.loads(out.read_text())
    assert result["fi16k"] == {"bleu": 3.54} and result["at_pairs"] == {"updates": 3250}  # kept
    assert result["fi16k_rule"]["bleu"] == 7.0 and result["met_rule"] == {"bleu": True, "chrf": True, "nll": False}
    assert (result["updates"], result["minutes"], result["threads"]) == (2000, 21.62, "2")
    assert "Romanian" in result["fine_tune_rule"]


def test_frontier_within_minutes_scores_the_last_checkpoint_that_fits_in_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--within-minutes 20``: of a run's checkpoints, the last whose training seconds fit in 20
    minutes is scored (not the closest, not a later one), with the CPU that trained it; the
    earlier keys of the results file stay, and no checkpoint within the minutes is an error."""
    import sys

    import metanmt.engine.checkpoint as ckpt

    frontier = bench_module("l10n_frontier", monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "frontier.json"
    seconds = {3250: 1130.0, 3500: 1190.0, 3750: 1205.0}  # 3,750 is 5 s past 20 minutes
    folders = []
    for step, secs in seconds.items():
        folder = runs / "multi" / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "seconds": secs, "examples_seen": 65 * step,
                                                               "tokens_seen": 800 * step}))
        folders.append(folder)
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda run: folders)
    out.write_text(json.dumps({"fi16k": {"bleu": 3.54}, "at_pairs": {"updates": 3250}}))
    monkeypatch.setattr(frontier, "exported", lambda r, step: tmp_path / f"multi_at_{step}")
    scored = []

    def finnish_16k(init, where, data_root, runs_, seeds, fine_tune):
        scored.append((init.name, where.name, seeds))
        return {"bleu": 6.3, "chrf": 25.0, "nll": 3.3}

    monkeypatch.setattr(frontier, "finnish_16k", finnish_16k)
    argv = ["l10n_frontier.py", "--data-root", str(tmp_path), "--runs", str(runs), "--out", str(out),
            "--within-minutes", "20", "--cpu", "Some CPU"]
    monkeypatch.setattr(sys, "argv", argv)
    frontier.main()
    assert scored == [("multi_at_3500", "compare_at_3500", 3)]
    result = json.loads(out.read_text())
    assert result["fi16k"] == {"bleu": 3.54} and result["at_pairs"] == {"updates": 3250}  # kept
    entry = result["within_minutes"]
    assert (entry["updates"], entry["minutes"], entry["pairs_seen"], entry["cpu"]) == (3500, 19.83, 227500, "Some CPU")
    assert entry["met"] == {"bleu": True, "chrf": False, "nll": True} and entry["fi16k"]["bleu"] == 6.3
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--within-minutes", "18"])
    with pytest.raises(SystemExit, match="no checkpoint within 18"):
        frontier.main()


def test_finetune_speed_benchmark_scores_both_ways_alike_and_times_both_loops(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_l10n(tmp_path / "l10n")
    run = make_run(root, tmp_path / "run")
    speed = bench_module("l10n_finetune_speed", monkeypatch)
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["l10n_finetune_speed.py", "--init", str(run), "--data-root", str(root), "--langs",
                                      "xa", "--budget", "300", "--updates", "2", "--warmup", "1", "--rounds", "1",
                                      "--out", str(out)])
    assert speed.main() == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert result["micro_tokens"] == 250 and result["init_step"] == 2 and row["lang"] == "xa"
    assert row["whole_batch_s_per_update"] > 0 and row["micro_batch_s_per_update"] > 0 and row["sorted_scoring_s"] > 0
    # the scorer as it was (file order) and the sorted one give the same NLLs
    assert row["nll_sorted"] == pytest.approx(row["nll_file_order"], abs=1e-6) and row["max_sentence_nll_difference"] < 1e-4


def test_readme_tables_print_from_the_committed_results(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """bench/readme_tables.py: the quick reproduction's table and curve, and the meta-step table, from
    the files under bench/results (the numbers the README quotes)."""
    tables = bench_module("readme_tables", monkeypatch)
    tables.compare_table("l10n_compare_quick")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| lang | budget | meta BLEU / chrF / NLL | multi BLEU / chrF / NLL")
    fi0 = next(line for line in lines if line.startswith("| fi | 0 |"))
    assert fi0 == ("| fi | 0 | 1.53 / 13.1 / 3.41 | 1.61 / 13.3 / 3.43 | – | 1 / 1 / 0 | "
                   "-0.08 (p=0.63) / -0.2 (p=0.31) / -0.02 (p=0.012*) |")  # as in README.md, "Results"
    tables.curve_table("l10n_compare_quick")
    curve = capsys.readouterr().out.splitlines()
    assert curve[0] == "| lang | budget | init | n | NLL at 0 | NLL at 10 | NLL at 30 | NLL at 100 |" and len(curve) > 2
    tables.meta_step_table()
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| family | algorithm | implementation |") and len(rows) > 3


def test_frontier_rule_flags_are_the_recorded_romanian_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--fine-tune rule``: compare's flags for the length recorded in bench/results (20 epochs, at most
    1,000 updates, no early stopping); a missing record is an error that says what it was."""
    frontier = bench_module("l10n_frontier", monkeypatch)
    assert frontier.rule_flags() == ["--epochs", "20", "--min-steps", "0", "--max-steps", "1000", "--patience", "0"]
    with pytest.raises(SystemExit, match="fine-tuning length chosen on Romanian"):
        frontier.rule_flags(tmp_path / "rule.json")
