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


def test_finetune_rule_is_chosen_on_dev_curves_by_chrf_and_a_rerun_scores_nothing(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/l10n_finetune_recipe.py: each budget's curve holds every update count a candidate rule
    gives it; the choice is the rule with the highest mean chrF (the fewest updates within 0.1)."""
    root = make_l10n(tmp_path / "l10n")
    run = make_run(root, tmp_path / "run")
    rule = bench_module("l10n_finetune_recipe", monkeypatch)
    out = tmp_path / "rule.json"
    argv = ["l10n_finetune_recipe.py", "--init", f"multi={run}", "--data-root", str(root), "--dev-lang", "xa",
            "--budgets", "100", "300", "--epochs", "1", "2", "--min-steps", "0", "3", "--max-steps", "4", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert rule.main() == 0
    info = json.loads(out.read_text())
    rules = rule.candidate_rules([1, 2], [0, 3], 4)
    for r in info["runs"]:
        wanted = {0, *(rule.rule_updates(r["batches_per_epoch"], **c) for c in rules)}
        assert set(map(int, r["points"])) == wanted and r["points"]["0"] == info["runs"][0]["points"]["0"]
    scores = {(c["epochs"], c["min_steps"]): sum(r["points"][str(rule.rule_updates(r["batches_per_epoch"], **c))]["chrf"]
                                                 for r in info["runs"]) / 2 for c in rules}
    choice = info["choice"]
    assert choice["mean_chrf"] == pytest.approx(scores[(choice["epochs"], choice["min_steps"])])
    assert choice["mean_chrf"] >= max(scores.values()) - rule.TIE
    # a rerun scores no curve again; --rechoose recomputes the same choice from the stored curves
    monkeypatch.setattr("metanmt.evaluation.compare.adaptation_curve", lambda *a, **k: pytest.fail("scored again"))
    assert rule.main() == 0
    monkeypatch.setattr(sys, "argv", argv + ["--rechoose"])
    assert rule.main() == 0 and json.loads(out.read_text())["choice"] == choice


def test_finetune_rule_choice_breaks_ties_by_fewer_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = bench_module("l10n_finetune_recipe", monkeypatch)
    # two budgets of 3 and 30 batches; chrF rises to 100 updates at the small one, flat past 30 at the large one
    small = {"0": 10.0, "15": 14.0, "30": 15.0, "60": 16.0, "100": 18.0, "120": 18.05}
    large = {"0": 10.0, "150": 20.0, "300": 20.02, "600": 20.0, "1000": 19.0}
    runs = [{"init": "multi", "budget": b, "batches_per_epoch": n, "points": {k: {"chrf": v} for k, v in p.items()}}
            for b, n, p in (("1k", 3, small), ("16k", 30, large))]
    rules = rule.candidate_rules([5, 10, 20, 40], [0, 100], 1000)
    for r in runs:  # every count the grid gives is on the curve
        assert {str(rule.rule_updates(r["batches_per_epoch"], **c)) for c in rules} <= set(r["points"])
    # best: 10 epochs, at least 100 updates (100 and 300: 19.01); 5 epochs with 100 (100 and 150: 19.0)
    # is within 0.1 with fewer updates, and wins
    choice = rule.choose(runs, rules)["choice"]
    assert (choice["epochs"], choice["min_steps"]) == (5, 100) and choice["updates"] == {"1k": 100, "16k": 150}
    assert choice["mean_chrf"] == pytest.approx(19.0)
    runs[1]["points"]["150"]["chrf"] = 19.0  # 5 epochs falls to 18.5: of the two left within 0.1, the fewer updates
    choice = rule.choose(runs, rules)["choice"]
    assert (choice["epochs"], choice["min_steps"]) == (10, 100) and choice["updates"] == {"1k": 100, "16k": 300}


def test_converged_meta_inits_continue_at_the_learning_rate_the_multitask_run_had_reached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta stage's constant lr is the multi-task schedule's lr for the update after the warm
    start, as the run itself logged it; a comparison without the rule measured refuses to start."""
    root = make_l10n(tmp_path / "l10n")
    run = make_run(root, tmp_path / "run", "optim.schedule=inverse_sqrt", "optim.warmup_steps=2", "train.steps=4",
                   "train.log_every=1")
    converged = bench_module("l10n_converged_compare", monkeypatch)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())
              if r.get("kind") == "train"}
    for step in (2, 3, 4):
        assert converged.lr_at(run, step) == pytest.approx(logged[step], rel=1e-12)
    monkeypatch.setattr(converged, "RULE", tmp_path / "rule.json")
    with pytest.raises(SystemExit, match="run --stage rule first"):
        converged.rule_flags(run)
    (tmp_path / "rule.json").write_text(json.dumps({"runs": [{"path": str(run.resolve()), "budget": "1k"}],
                                                    "choice": {"epochs": 5, "min_steps": 100, "max_steps": 1000}}))
    with pytest.raises(SystemExit, match="not been measured on"):
        converged.rule_flags(run)
    (tmp_path / "rule.json").write_text(json.dumps({"runs": [{"path": str(run.resolve()), "budget": b} for b in
                                                             ("1k", "4k", "16k", "40k")],
                                                    "choice": {"epochs": 20, "min_steps": 0, "max_steps": 1000}}))
    assert converged.rule_flags(run) == ["--epochs", "20", "--min-steps", "0", "--max-steps", "1000", "--patience", "0"]


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


def test_converged_study_trains_or_resumes_the_multitask_run_to_its_final_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study starts from nothing: the frontier multi-task run is trained to FINAL, resumed where a
    sitting left it, and left alone once it is there."""
    import subprocess

    import metanmt.engine.checkpoint as ckpt

    converged = bench_module("l10n_converged_compare", monkeypatch)
    ran, state = [], {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(ckpt, "latest_trainer_state", lambda run: state)
    runs = tmp_path / "runs"
    command = converged.train_multi(runs, tmp_path / "l10n")
    assert ran == [command] and "--resume" not in command
    assert "l10n_frontier.yaml" in command[4] and f"train.steps={converged.FINAL}" in command
    assert command[command.index("--output-dir") + 1] == str(runs / "multi")
    (runs / "multi").mkdir(parents=True)
    (runs / "multi" / "metanmt.yaml").write_text("family: translation\n")
    state["step"] = 3771
    assert converged.train_multi(runs, tmp_path / "l10n")[-1] == "--resume"
    state["step"] = converged.FINAL + 250
    assert converged.train_multi(runs, tmp_path / "l10n") is None and len(ran) == 2


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
