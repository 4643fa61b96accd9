"""compare: every (init, language, budget, seed) cell on a tiny model and corpus; CSV, markdown and
PNG written; finished cells reused (and said to be); incomplete budgets noted, a missing one an
error; a partial report says how many cells are missing."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from metanmt.adaptation.finetune import Finetuner
from metanmt.cli import main
from metanmt.errors import DataError, UserError
from metanmt.evaluation.compare import REQUIRED_COLUMNS, budget_words, compare, parse_init
from tests.test_adaptation import make_l10n, make_run, recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("compare")
    root = make_l10n(base / "l10n")
    # xa's pool is its 100-word file, as Latvian's is its 16k file: xa 300 repeats it (skipped, noted)
    shutil.copy(root / "finetune" / "xa.100.tsv.gz", root / "finetune" / "xa.300.tsv.gz")
    split = json.loads((root / "split.json").read_text())
    split["finetune"]["xa"] = {b: {"complete": False, "en_words": 100} for b in ("100", "300")}
    (root / "split.json").write_text(json.dumps(split))
    multi = make_run(root, base / "multi")
    meta = make_run(root, base / "meta", "algorithm.name=fomaml", "algorithm.inner_lr=0.05")
    return root, multi, meta


def test_compare_writes_the_report_and_reuses_finished_cells(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture) -> None:
    root, multi, meta = setup
    out = tmp_path / "report"
    args = ["compare", "--init", f"meta={meta}", "--init", f"multi={multi}", "--data-root", str(root),
            "--langs", "xa", "xb", "--budgets", "0", "100", "300", "--seeds", "2", "--out", str(out),
            "--beam", "2", "--max-test-segments", "6", "--lr", "0.003", "--max-tokens", "60", "--epochs", "1",
            "--max-steps", "3", "--curve", "0", "2", "--dev", "dev/xa.tsv.gz", "--dev-segments", "4",
            "--dev-metric", "loss"]
    assert main(args) == 0

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[: len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    cells = {(r["init"], r["lang"], r["budget"], r["seed"]) for r in rows}
    # zero-shot: one row per real init and language; scratch only where it is fine-tuned;
    # xa 300 repeats xa 100, its whole pool (skipped); xb 300 is incomplete (the pool) and is run once, noted
    assert ("meta", "xa", "0", "0") in cells and ("meta", "xa", "0", "1") not in cells
    assert not any(c[0] == "scratch" and c[2] == "0" for c in cells)
    assert not any(c[1] == "xa" and c[2] == "300" for c in cells)
    assert {("scratch", "xb", "300", "1"), ("multi", "xb", "100", "0")} <= cells
    assert all(r["note"].startswith("incomplete budget") for r in rows if r["budget"] == "300")
    assert len(rows) == 2 * 2 + 3 * (2 + 1) * 2  # zero-shot (2 inits x 2 langs) + fine-tuned cells
    for r in rows:
        assert 0.0 <= float(r["bleu"]) <= 100.0 and float(r["nll"]) > 0 and float(r["seconds"]) > 0
        assert (int(r["steps"]) == 0) == (r["budget"] == "0")
        assert r["init_steps"] == ("" if r["init"] == "scratch" else "2")  # meta-training compute of the init
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| xb | 100 | meta |" in md and "±" in md and "NLL" in md
    assert "xa 300: skipped" in md and "xa 100 already uses the whole pool" in md and "Each init minus multi" in md
    assert "all 22 cells finished" in md and "Partial report" not in md
    assert "Student t" in md and "Holm" in md and "paired bootstrap" in md and "permutation" in md
    assert (out / "bleu_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adaptation_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists() or not any((out / "work").iterdir())

    # significance against the reference (multi by default), n, and the adaptation curve
    assert list(rows[0])[-8:] == ["n_seeds", "p_bleu", "p_chrf", "p_nll", "nll_at_0", "nll_at_2", "chrf_at_0", "chrf_at_2"]
    for r in rows:
        assert int(r["n_seeds"]) == (1 if r["budget"] == "0" else 2)
        tested = r["init"] != "multi" and not (r["init"] == "scratch" and r["budget"] == "0")
        for key in ("p_bleu", "p_chrf", "p_nll"):
            assert (r[key] != "") == tested, (r["init"], r["budget"], key)
            assert not tested or 0.0 < float(r[key]) <= 1.0
        assert (r["nll_at_2"] != "") == (r["budget"] != "0")
    tuned = [r for r in rows if r["budget"] == "100" and r["lang"] == "xa"]
    for init in ("meta", "multi"):  # the curve starts at the init itself: the zero-shot NLL, every seed
        at0 = {r["nll_at_0"] for r in tuned if r["init"] == init}
        zero = next(r for r in rows if r["init"] == init and r["lang"] == "xa" and r["budget"] == "0")
        assert len(at0) == 1 and float(at0.pop()) == pytest.approx(float(zero["nll"]), abs=2e-4)
    assert all(float(r["nll_at_2"]) < float(r["nll_at_0"]) for r in tuned)  # two updates on the data help
    cell = json.loads((out / "cells" / "meta__xb__100__s1.json").read_text(encoding="utf-8"))
    assert len(cell["hyps"]) == len(cell["sentence_nll"]) == len(cell["sentence_tokens"]) == 6
    assert sum(cell["sentence_nll"]) / sum(cell["sentence_tokens"]) == pytest.approx(cell["nll"])
    assert set(cell["curve"]) == {"0", "2"}

    # the report is recomputed from the stored cells alone, byte for byte (p-values included)
    first_csv, first_md = (out / "results.csv").read_bytes(), (out / "results.md").read_bytes()
    monkeypatch.setattr("metanmt.evaluation.compare.translate_batch",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("translated again")))
    (out / "results.csv").unlink()
    assert main(args + ["--report-only"]) == 0
    assert (out / "results.csv").read_bytes() == first_csv and (out / "results.md").read_bytes() == first_md
    monkeypatch.undo()

    # --report-only rewrites the report from the finished cells and runs nothing; it says what is missing
    (out / "results.md").unlink()
    caplog.set_level(logging.INFO, logger="metanmt")
    capsys.readouterr()
    assert main(args + ["--report-only", "--seeds", "3"]) == 0
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| xb | 100 | meta |" in md
    assert "Partial report: 22 of 31 cells finished; 9 missing" in md  # seed 2: 3 budgets x 3 inits
    assert "22 of 31 cells finished; 9 missing" in caplog.text
    assert "report of 22 of the 31 cells (9 not finished)" in capsys.readouterr().out
    assert not list((out / "cells").glob("*__s2.json"))

    # a second run reuses every finished cell: no fine-tune happens
    def forbidden(*_a, **_k):
        raise AssertionError("a finished cell was fine-tuned again")

    monkeypatch.setattr(Finetuner, "run", forbidden)
    before = (out / "results.csv").read_text(encoding="utf-8")
    caplog.clear()
    assert main(args) == 0
    assert (out / "results.csv").read_text(encoding="utf-8") == before
    assert f"all 22 cells were already finished in {out}; the report was rewritten" in caplog.text
    assert "all 22 cells were already finished; report rewritten" in capsys.readouterr().out
    assert "Partial report" not in (out / "results.md").read_text(encoding="utf-8")

    # other settings on the same report folder are refused (its cells would not be comparable)
    assert main([*args[:-1], "chrf"]) == 2


def test_curve_seeds_limits_the_adaptation_curve_to_the_first_seeds(setup: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    """--curve-seeds 1: every seed is fine-tuned and scored, only seed 0 runs the curve, and the
    report's curve table says n = 1 beside the early-stopped n = 2."""
    root, multi, _ = setup
    kw = dict(inits=[("multi", str(multi))], data_root=root, langs=["xb"], budgets=["100"], seeds=2,
              recipe=recipe(max_steps=2, dev_metric="loss"), scratch=False, num_beams=1, max_test_segments=4,
              curve=[0, 2])
    with pytest.raises(UserError, match="--curve-seeds: must be at least 1"):
        compare(out=tmp_path / "bad", curve_seeds=0, **kw)
    out = tmp_path / "report"
    rows = compare(out=out, curve_seeds=1, **kw)["rows"]
    assert sorted((r["seed"], "curve" in r) for r in rows) == [(0, True), (1, False)]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| xb | 100 | multi | 1 |" in md  # the curve table's n
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        by_seed = {r["seed"]: r for r in csv.DictReader(f)}
    assert by_seed["0"]["nll_at_2"] != "" and by_seed["1"]["nll_at_2"] == "" and by_seed["1"]["n_seeds"] == "2"
    with pytest.raises(UserError, match="curve_seeds"):  # its cells were made with the limit
        compare(out=out, curve_seeds=2, **kw)


def test_a_cell_records_its_curve_on_its_own_fine_tune(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that runs from update 0 past the curve's last point scores the curve on its own
    fine-tune: no second fine-tune, and the scores a separate curve run gives (a curve that reaches
    past the cell's length runs one, for every point)."""
    root, multi, _ = setup
    runs: list[str] = []
    original = Finetuner.run

    def counted(self: Finetuner, resume: bool = False, overwrite: bool = False):
        runs.append(self.output_dir.name)
        return original(self, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(Finetuner, "run", counted)
    kw = dict(inits=[("multi", str(multi))], data_root=root, langs=["xb"], budgets=["100"], seeds=1,
              recipe=recipe(max_steps=3, dev_metric="loss"), scratch=False, num_beams=1, max_test_segments=4)
    inside = compare(out=tmp_path / "inside", curve=[0, 1, 3], **kw)["rows"][0]
    assert runs == ["multi__xb__100__s0"] and inside["steps"] == 3
    runs.clear()
    separate = compare(out=tmp_path / "separate", curve=[0, 1, 3, 5], **kw)["rows"][0]
    assert runs == ["multi__xb__100__s0", "multi__xb__100__s0__curve"]
    assert {k: separate["curve"][k] for k in ("0", "1", "3")} == inside["curve"]
    assert inside["curve"]["1"] != inside["curve"]["3"]  # the points are scored on different weights
    # the cell itself is the same either way, and its fine-tune's seconds leave the curve's scoring out
    assert (inside["bleu"], inside["nll"]) == (separate["bleu"], separate["nll"])
    assert inside["curve_seconds"] > 0


def test_an_interrupted_cell_restarts_cleanly(setup: tuple[Path, Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, multi, _ = setup
    out = tmp_path / "report"
    kw = dict(inits=[("multi", str(multi))], data_root=root, langs=["xb"], budgets=["100"], seeds=1, out=out,
              recipe=recipe(max_steps=4, eval_every=2, dev_metric="loss"), scratch=False, dev="dev/xa.tsv.gz",
              num_beams=1, max_test_segments=4, curve=[])
    original = Finetuner.run

    def killed_run(self: Finetuner, resume: bool = False, overwrite: bool = False):
        self.after_update = lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None
        return original(self, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(Finetuner, "run", killed_run)
    with pytest.raises(KeyboardInterrupt):
        compare(**kw)
    assert (out / "work" / "multi__xb__100__s0" / "checkpoints" / "last.pt").is_file()
    assert not (out / "cells" / "multi__xb__100__s0.json").exists()
    monkeypatch.setattr(Finetuner, "run", original)
    resumed = compare(**kw)
    assert resumed["ran"] == 1 and resumed["rows"][0]["steps"] == 4
    fresh = compare(**{**kw, "out": tmp_path / "fresh"})
    for key in ("bleu", "chrf", "nll", "steps", "pairs_seen", "best_step"):
        assert resumed["rows"][0][key] == fresh["rows"][0][key], key


def test_arguments() -> None:
    assert budget_words("4k") == 4000 and budget_words("0") == 0 and budget_words("pool") is None
    assert parse_init("meta=runs/meta") == ("meta", "runs/meta")
    with pytest.raises(UserError):
        parse_init("runs/meta")
    with pytest.raises(UserError):
        budget_words("lots")


def test_plan_orders_cells_by_seed_and_limits_scratch_seeds(setup: tuple[Path, Path, Path]) -> None:
    from metanmt.evaluation.compare import plan_cells

    root = setup[0]
    plan = plan_cells(["meta", "multi", "scratch"], {"scratch"}, root, ["xa", "xb"], ["0", "100"], 3,
                      "finetune/{lang}.{budget}.tsv.gz", scratch_seeds=1)
    zero = [c for c in plan.cells if c[2] == "0"]
    assert plan.cells[: len(zero)] == zero and {c[0] for c in zero} == {"meta", "multi"}
    tuned = plan.cells[len(zero):]
    assert [c[3] for c in tuned] == sorted(c[3] for c in tuned)  # seed 0 of every cell before seed 1
    assert {c[3] for c in tuned if c[0] == "scratch"} == {0}
    assert {c[3] for c in tuned if c[0] == "meta"} == {0, 1, 2}
    assert len(tuned) == 2 * (3 + 3 + 1)
    with pytest.raises(UserError, match="--scratch-seeds"):
        compare([("meta", str(setup[2]))], root, ["xa"], ["100"], 2, root.parent / "r", recipe(), scratch_seeds=0)


def test_a_repeated_pool_budget_is_a_note_where_another_language_has_it_and_an_error_where_none_does(
        setup: tuple[Path, Path, Path]) -> None:
    """xa 300 repeats xa's whole pool (xa 100): skipped with a note while xb has a 300 cell; asked
    for xa alone, budget 300 would have no cell at all, which is an error naming why."""
    from metanmt.evaluation.compare import plan_cells

    root, pattern = setup[0], "finetune/{lang}.{budget}.tsv.gz"
    plan = plan_cells(["multi"], set(), root, ["xa", "xb"], ["100", "300"], 1, pattern)
    assert ("xa", "300") not in plan.files and ("xb", "300") in plan.files
    assert any(n.startswith("xa 300: skipped") and "xa 100 already uses the whole pool" in n for n in plan.notes)
    with pytest.raises(DataError, match=r"^--budgets 300: no cell for any of --langs xa \(xa 300: skipped, the "
                                        r"pool \(100 English words\) cannot fill it and xa 100 already uses the "
                                        r"whole pool\)"):
        plan_cells(["multi"], set(), root, ["xa"], ["100", "300"], 1, pattern)
    for langs, budgets, flag in ((["xa"], [], "--budgets"), ([], ["100"], "--langs")):
        with pytest.raises(UserError, match=f"{flag}: give at least one"):
            plan_cells(["multi"], set(), root, langs, budgets, 1, pattern)


def test_evaluate_refuses_an_empty_test_file_and_options_a_translation_run_ignores(setup: tuple[Path, Path, Path],
                                                                                    tmp_path: Path, capsys) -> None:
    root, multi, _ = setup
    empty, hyp = tmp_path / "xa.tsv", tmp_path / "hyp.txt"
    empty.write_text("")
    assert main(["evaluate", str(multi), "--test", str(empty), "--hyp", str(hyp)]) == 2
    err = capsys.readouterr().err
    assert f"metanmt evaluate: error: {empty}: empty corpus" in err and "Traceback" not in err and not hyp.exists()
    test = root / "test" / "xa.tsv.gz"
    assert main(["evaluate", str(multi), "--test", str(test), "--steps", "3", "--episodes", "5"]) == 2
    assert "--steps, --episodes would do nothing for a translation run (its evaluation reads --test, --beam, " \
           "--batch-size, --hyp, --lang); drop them" in capsys.readouterr().err


def test_a_warm_started_init_counts_the_warm_start_compute(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Pretrain-then-meta-train is compared at its whole cost: the warm start's steps, pairs and
    seconds are added to the meta-training run's own (the compare report's compute table)."""
    from metanmt.adaptation.loading import meta_training_state, open_translation_model

    root, multi, _ = setup
    warm = make_run(root, tmp_path / "warm", f"model.pretrained={multi}", "algorithm.name=fomaml", "algorithm.inner_lr=0.05")
    base, own = meta_training_state(multi), meta_training_state(warm)["own"]
    total = open_translation_model(warm).meta_training
    assert own["step"] == base["step"] == 2
    for key in ("step", "examples_seen", "tokens_seen", "seconds"):
        assert total[key] == pytest.approx(own[key] + base[key])
    assert total["warm_start"]["path"] == str(multi) and total["warm_start"]["examples_seen"] == base["examples_seen"]

    # a warm start that is gone is said, and its compute is not invented
    (warm / "metanmt.yaml").write_text((warm / "metanmt.yaml").read_text().replace(str(multi), str(tmp_path / "gone")))
    state = meta_training_state(warm)
    assert state["step"] == own["step"] and "missing" in state["warm_start"]


SHARED_L10N = next((p for p in (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "l10n",
                                Path(__file__).resolve().parents[2].parent / "shared" / "data" / "l10n") if p.is_dir()), None)


def _lines(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def test_a_budget_without_a_file_is_the_prefix_of_the_next_file(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``1k`` is the first 1,000 English words of the 4k file; here ``50`` is cut from the ``100``
    file, which is itself the prefix of the ``300`` file (nested budgets), and trained on."""
    from metanmt.adaptation.finetune import english_words, take_budget
    from metanmt.data.corpus import read_pairs
    from metanmt.evaluation.compare import plan_cells

    root, multi, _ = setup
    plan = plan_cells(["multi"], set(), root, ["xb"], ["50", "100", "300"], 1, "finetune/{lang}.{budget}.tsv.gz")
    assert plan.cuts == {("xb", "50"): 50} and plan.files[("xb", "50")].name == "xb.100.tsv.gz"
    assert any("first 50 English words of xb.100.tsv.gz" in n for n in plan.notes)
    # the files are nested prefixes, and the cut is the prefix it claims
    f100, f300 = _lines(root / "finetune" / "xb.100.tsv.gz"), _lines(root / "finetune" / "xb.300.tsv.gz")
    assert f300[: len(f100)] == f100
    pairs = read_pairs(root / "finetune" / "xb.100.tsv.gz")
    cut, info = take_budget(pairs, 50, "prefix")
    assert cut == pairs[: len(cut)] and english_words(cut) >= 50 > english_words(cut[:-1])
    assert cut == take_budget(read_pairs(root / "finetune" / "xb.300.tsv.gz"), 50, "prefix")[0]
    # no larger file: an error naming the language's files
    with pytest.raises(DataError, match=r"^--budgets 400: xa 400 has no fine-tuning file .*xa\.400\.tsv\.gz and no "
                                        r"larger budget file to cut it from \(fine-tuning files of xa: "
                                        r"xa\.100\.tsv\.gz, xa\.300\.tsv\.gz\)"):
        plan_cells(["multi"], set(), root, ["xa"], ["400"], 1, "finetune/{lang}.{budget}.tsv.gz")

    # (the larger budget is looked for among the requested ones and 4k 16k 40k pool)
    result = compare([("multi", str(multi))], root, ["xb"], ["50", "100"], 1, tmp_path / "r", recipe(max_steps=2),
                     scratch=False, num_beams=1, max_test_segments=4, curve=[])
    row = next(r for r in result["rows"] if r["budget"] == "50")
    assert row["pairs"] == len(cut) and row["words"] == english_words(cut)
    assert row["note"] == "first 50 English words of xb.100.tsv.gz"


@pytest.mark.skipif(SHARED_L10N is None, reason="the shared l10n data is not beside the checkout")
def test_the_shared_budget_files_are_nested_prefixes_and_1k_is_the_4k_prefix() -> None:
    from metanmt.adaptation.finetune import english_words, take_budget
    from metanmt.data.corpus import read_pairs
    from metanmt.evaluation.compare import plan_cells

    assert SHARED_L10N is not None
    for lang in ("lv", "fi", "tr", "ko"):
        files = [_lines(SHARED_L10N / "finetune" / f"{lang}.{b}.tsv.gz") for b in ("4k", "16k", "40k", "pool")]
        for small, large in zip(files, files[1:]):
            assert large[: len(small)] == small, lang
        four = read_pairs(SHARED_L10N / "finetune" / f"{lang}.4k.tsv.gz")
        cut, _ = take_budget(four, 1000, "prefix")
        assert cut == four[: len(cut)] and english_words(cut) >= 1000 > english_words(cut[:-1])
    plan = plan_cells(["multi"], set(), SHARED_L10N, ["fi"], ["0", "1k", "4k"], 1, "finetune/{lang}.{budget}.tsv.gz")
    assert plan.cuts == {("fi", "1k"): 1000} and plan.files[("fi", "1k")].name == "fi.4k.tsv.gz"
