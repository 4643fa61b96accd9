"""Nothing lost, nothing silently wrong: checks before any deletion, no output over an input, value
ranges of flags, file-system errors and damaged files as one line, folder locks. The CLI runs
in-process (``metanmt.cli.main``) on tiny sinusoid runs and tiny corpora the tests write."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metanmt.cli import main
from metanmt.errors import DataError
from metanmt.locking import LOCK_FILE, _start_time

ROOT = Path(__file__).resolve().parents[1]
SINE = ["train.steps=4", "train.save_every=2", "train.meta_batch_size=2", "train.trackers=[]", "model.hidden=[8]",
        "train.log_every=100", "train.keep_checkpoints=5"]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    """Exit status and the lines of stderr that carry ``error:`` (argparse's and metanmt's)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if "error:" in line]


def sine(capsys: pytest.CaptureFixture, out: Path, *extra: str, sets: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    args = ["meta-train", ROOT / "configs" / "sinusoid_maml.yaml", "--output-dir", out]
    for s in (*SINE, *sets):
        args += ["--set", s]
    return cli(capsys, *args, *extra)


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    out = tmp_path / "run"
    assert sine(capsys, out) == (0, [])
    return out


# -- --overwrite: everything is checked first, and only metanmt's own files are removed ----------


@pytest.mark.parametrize("bad", ["optim.lr=-1", "optim.betas=[0.9]", "train.steps=0", "train.meta_batch_size=0",
                                 "algorithm.name=mamll", "optim.grad_clip=-1"])
def test_overwrite_with_a_bad_config_leaves_the_run_untouched(run: Path, capsys, bad: str) -> None:
    before = listing(run)
    rc, errors = sine(capsys, run, "--overwrite", sets=(bad,))
    assert rc == 2 and len(errors) == 1
    assert bad.split("=")[0] in errors[0] or "unknown algorithm 'mamll'" in errors[0]
    assert listing(run) == before


def test_overwrite_never_deletes_a_folder_metanmt_did_not_write(run: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    rc, errors = sine(capsys, notes, "--overwrite")
    assert rc == 2 and len(errors) == 1 and "notes.txt" in errors[0] and "did not write" in errors[0]
    assert (notes / "notes.txt").read_text() == "my notes"
    (run / "notes.txt").write_text("mine too")  # a run folder with something of the user's in it
    before = listing(run)
    rc, errors = sine(capsys, run, "--overwrite")
    assert rc == 2 and "notes.txt" in errors[0] and listing(run) == before
    (run / "notes.txt").unlink()
    assert sine(capsys, run, "--overwrite", sets=("train.steps=2",)) == (0, [])  # a run of metanmt's own is replaced
    assert "checkpoints/step_00000004/manifest.json" not in listing(run)


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    rc, errors = sine(capsys, target)
    assert rc == 2 and "is a file; expected a folder" in errors[0] and target.read_text() == "x"
    rc, errors = sine(capsys, target / "sub")
    assert rc == 2 and "is a file, not a folder" in errors[0]


# -- late errors: checked first, or the folder is given back ------------------------------------


def write_corpus(root: Path, bad_dev: bool = False) -> Path:
    words = "open save file close print user name date time page list edit delete folder new old".split()

    def tsv(path: Path, lang: str, n: int, shift: int) -> None:
        rows = [f"{lang}\t{words[(i + shift) % 16][::-1]} {words[i % 16][::-1]}\t{words[(i + shift) % 16]} {words[i % 16]}"
                for i in range(n)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(("lang\tsrc\ten\n" + "\n".join(rows) + "\n").encode()))

    for lang in ("aa", "bb"):
        tsv(root / "meta_train" / f"{lang}.tsv.gz", lang, 40, 1)
    tsv(root / "dev" / "xa.tsv.gz", "xa", 12, 3)
    tsv(root / "finetune" / "xa.4k.tsv.gz", "xa", 12, 5)
    if bad_dev:
        (root / "dev" / "xa.tsv.gz").write_bytes(gzip.compress(b"lang\tsrc\ten\nxa\tonly two fields\n"))
    return root


TINY_TRANSLATION = ["family=translation", "task.source=files", "task.train_languages=[aa, bb]", "task.dev_languages=[xa]",
                    "task.vocab_size=300", "task.vocab_cache=false", "task.support_tokens=20", "task.query_tokens=20",
                    "task.max_source_length=12", "task.max_target_length=12", "task.max_new_tokens=8",
                    "task.dev_finetune_steps=1", "task.dev_max_segments=2", "model.d_model=16", "model.encoder_layers=1",
                    "model.decoder_layers=1", "model.attention_heads=2", "model.ffn_dim=16", "model.max_positions=16",
                    "algorithm.name=multitask", "train.steps=1", "train.meta_batch_size=1", "train.trackers=[]"]


@pytest.mark.parametrize("problem, message", [("vocab", "task.vocab_size"), ("dev", "xa.tsv.gz:2")])
def test_errors_found_late_are_reported_before_the_folder_is_claimed(tmp_path: Path, capsys, problem, message) -> None:
    root = write_corpus(tmp_path / "data", bad_dev=problem == "dev")
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = [*TINY_TRANSLATION, f"data.root={root}", "train.eval_every=1"]
    if problem == "vocab":
        sets.append("task.vocab_size=270")  # fewer pieces than the text's characters need
    out = tmp_path / "run"
    rc, errors = cli(capsys, "meta-train", config, "--output-dir", out, *[x for s in sets for x in ("--set", s)])
    assert rc == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_a_failure_after_the_claim_gives_the_folder_back(tmp_path: Path, capsys, monkeypatch) -> None:
    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    out = tmp_path / "run"
    trainer = MetaTrainer(load_config(ROOT / "configs" / "sinusoid_maml.yaml", SINE), out)

    def fails(step: int) -> dict:
        raise DataError("a problem only training finds")

    monkeypatch.setattr(trainer, "meta_step", fails)
    with pytest.raises(DataError):
        trainer.train()
    assert not out.exists()
    assert sine(capsys, out) == (0, [])  # the corrected rerun is not refused as "already holds a run"


# -- locks -----------------------------------------------------------------------------------------


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_recovered(run: Path, capsys, caplog) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                  "start": _start_time(other.pid)}))
        before = listing(run)
        for extra in (["--resume"], ["--overwrite"]):
            rc, errors = sine(capsys, run, *extra, sets=("train.steps=6",))
            assert rc == 2 and len(errors) == 1 and f"in use by process {other.pid}" in errors[0]
            assert listing(run) == before
    finally:
        other.kill()
        other.wait()
    assert sine(capsys, run, "--resume", sets=("train.steps=6",)) == (0, [])  # the owner is gone: stale
    assert "taking over a stale lock" in caplog.text
    assert not (run / LOCK_FILE).exists()  # released at the end


# -- no command writes over one of its inputs -----------------------------------------------------


def test_translate_never_writes_over_its_input(tmp_path: Path, capsys) -> None:
    src = tmp_path / "a.txt"
    src.write_text("Bună ziua\n")
    link = tmp_path / "link.txt"
    link.symlink_to(src)
    for output in (src, tmp_path / "." / "a.txt", link):
        rc, errors = cli(capsys, "translate", tmp_path / "no-run", "--input", src, "--output", output)
        assert rc == 2 and "same file as --input" in errors[0]
    assert src.read_text() == "Bună ziua\n"
    rc, errors = cli(capsys, "translate", tmp_path / "no-run", "--input", src, "--output", tmp_path)
    assert rc == 2 and "is a folder; expected a file" in errors[0]


def test_finetune_and_compare_outputs_never_overlap_their_inputs(run: Path, tmp_path: Path, capsys) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("lang\tsrc\ten\nxa\ta\tb\n")
    before = listing(run)
    for out in (run, run / "ft"):
        rc, errors = cli(capsys, "finetune", run, "--train", train, "--output-dir", out, "--overwrite")
        assert rc == 2 and "the initialization" in errors[0]
    rc, errors = cli(capsys, "finetune", run, "--train", train, "--output-dir", tmp_path, "--overwrite")
    assert rc == 2 and "holds --train" in errors[0]
    assert listing(run) == before and train.is_file()
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    (data / "test" / "xa.tsv.gz").write_bytes(b"")
    report = tmp_path / "report"
    rc, errors = cli(capsys, "compare", "--init", "a=/nope", "--data-root", data, "--langs", "xa", "--out", report)
    assert rc == 2 and "--init a=/nope: no such run" in errors[0] and not report.exists()
    rc, errors = cli(capsys, "compare", "--init", f"a={run}", "--data-root", data, "--langs", "xa", "--out", run)
    assert rc == 2 and "holds --init a" in errors[0] and listing(run) == before


def test_gettext_out_inside_the_catalogs_is_refused(tmp_path: Path, capsys) -> None:
    locale = tmp_path / "locale"
    (locale / "ro" / "LC_MESSAGES").mkdir(parents=True)
    (locale / "ro" / "LC_MESSAGES" / "app.po").write_text('msgid "Open"\nmsgstr "Deschide"\n')
    rc, errors = cli(capsys, "data", "gettext", locale, "--out", locale / "ro")
    assert rc == 2 and "lies inside" in errors[0]
    assert cli(capsys, "data", "gettext", locale, "--out", tmp_path / "corpus") == (0, [])


# -- asked for work that selects none: one line naming what is missing, exit 2, nothing written ------


def fake_init(tmp_path: Path) -> Path:
    """A folder that passes for an init (it has a config.json): every error below comes before one is opened."""
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    return init


def compare_data(root: Path) -> Path:
    """Test files for xa and xl; fine-tuning files xa.4k, and xl.{4k,16k,40k} where xl's 16k is its
    whole pool (as Latvian's: 40k repeats it); dev/xa. Empty files: the errors come before any is read."""
    for name in ("test/xa.tsv.gz", "test/xl.tsv.gz", "finetune/xa.4k.tsv.gz", "finetune/xl.4k.tsv.gz",
                 "finetune/xl.16k.tsv.gz", "finetune/xl.40k.tsv.gz", "dev/xa.tsv.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    split = {"finetune": {"xl": {b: {"complete": False, "en_words": 15667} for b in ("16k", "40k")}}}
    (root / "split.json").write_text(json.dumps(split))
    return root


@pytest.mark.parametrize("extra, expected", [
    (["--langs", "xa", "--budgets", "0", "16k"],  # fi.4k but no fi.16k: a typo must not read as a finished study
     ["--budgets 16k: xa 16k has no fine-tuning file", "xa.16k.tsv.gz and no larger budget file",
      "(fine-tuning files of xa: xa.4k.tsv.gz)"]),
    (["--langs", "xa", "xq", "--budgets", "4k"],
     ["--langs xq: no test file", "xq.tsv.gz", "(test files there: xa.tsv.gz, xl.tsv.gz)"]),
    (["--langs", "xl", "--budgets", "4k", "16k", "40k"],
     ["--budgets 40k: no cell for any of --langs xl", "xl 40k: skipped", "xl 16k already uses the whole pool"]),
    (["--langs", "xa", "--budgets", "4k", "--no-scratch", "--scratch-seeds", "1"],
     ["--scratch-seeds 1: there is no from-scratch row"]),
    (["--langs", "xa", "--budgets", "4k", "--curve", "--curve-seeds", "1"],
     ["--curve-seeds 1: no cell has an adaptation curve (--curve has no values)"]),
    (["--langs", "xa", "--budgets", "0", "--curve-seeds", "1"], ["--curve-seeds 1: no cell has an adaptation curve",
                                                                 "--budgets 0 fine-tunes nothing"]),
    (["--langs", "xa", "--budgets", "0", "--init", "floor=random"],
     ["--init floor=random: a from-scratch row has no zero-shot cell"]),
    (["--langs", "xa", "--budgets", "0", "--reference", "scratch"],
     ["--reference scratch: a from-scratch row has no zero-shot cell"]),
    (["--langs", "xa", "xl", "--budgets", "4k", "--dev", "dev/{lang}.tsv.gz"],
     ["--dev dev/{lang}.tsv.gz: no dev file", "xl.tsv.gz"]),
    (["--langs", "xa", "--budgets", "4k", "--report-only"],
     ["--report-only: none of the 2 planned cells is finished", "nothing to report"]),
    (["--langs", "xa", "--budgets", "4k", "--report-only", "--overwrite"], ["--report-only with --overwrite"]),
])
def test_compare_that_selects_no_cell_fails_before_out_is_written(tmp_path: Path, capsys, extra, expected) -> None:
    data, out = compare_data(tmp_path / "data"), tmp_path / "report"
    rc, errors = cli(capsys, "compare", "--init", f"a={fake_init(tmp_path)}", "--data-root", data, "--seeds", "1",
                     "--out", out, *extra)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("metanmt compare: error: ")
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert not out.exists()


def test_finetune_translate_and_score_with_nothing_to_do_fail_and_write_nothing(tmp_path: Path, capsys) -> None:
    init, out = fake_init(tmp_path), tmp_path / "ft"
    empty = tmp_path / "xa.tsv"
    empty.write_text("")
    rc, errors = cli(capsys, "finetune", init, "--train", empty, "--output-dir", out)
    assert rc == 2 and len(errors) == 1 and "xa.tsv: empty corpus" in errors[0] and not out.exists()
    train = tmp_path / "xa.train.tsv"
    train.write_text("lang\tsrc\ten\nxa\ta b\tc d\n")
    rc, errors = cli(capsys, "finetune", init, "--train", train, "--output-dir", out, "--budget-order", "sample")
    assert rc == 2 and len(errors) == 1 and "--budget-order sample: picks the pairs of a --budget-words" in errors[0]
    assert not out.exists()

    src, hyp = tmp_path / "src.txt", tmp_path / "hyp.txt"
    src.write_text("")
    rc, errors = cli(capsys, "translate", init, "--input", src, "--output", hyp)
    assert rc == 2 and len(errors) == 1 and f"--input {src}: no segments to translate" in errors[0] and not hyp.exists()
    ref = tmp_path / "ref.txt"
    ref.write_text("")
    rc, errors = cli(capsys, "score", "--hyp", src, "--ref", ref)
    assert rc == 2 and len(errors) == 1 and f"--hyp {src} and --ref {ref}: both files are empty" in errors[0]


def test_data_gettext_without_catalogs_or_translations_fails_and_writes_nothing(tmp_path: Path, capsys) -> None:
    locale, out = tmp_path / "locale", tmp_path / "corpus"
    (locale / "ro" / "LC_MESSAGES").mkdir(parents=True)
    rc, errors = cli(capsys, "data", "gettext", locale, "--out", out)
    assert rc == 2 and len(errors) == 1 and f"{locale}: no gettext catalogs (*.po, *.mo) found" in errors[0]
    assert not out.exists()
    (locale / "ro" / "LC_MESSAGES" / "app.po").write_text('msgid "Open"\nmsgstr ""\n')  # untranslated only
    rc, errors = cli(capsys, "data", "gettext", locale, "--out", out)
    assert rc == 2 and len(errors) == 1 and "no translated entries in 1 catalogs" in errors[0] and not out.exists()


def test_evaluate_refuses_options_the_family_does_not_read_and_sinusoid_reads_its_seed(run: Path, tmp_path: Path,
                                                                                      capsys) -> None:
    hyp = tmp_path / "hyp.txt"
    rc, errors = cli(capsys, "evaluate", run, "--episodes", "2", "--test", tmp_path / "t.tsv", "--hyp", hyp)
    assert rc == 2 and len(errors) == 1 and "--test, --hyp would do nothing for a sinusoid run" in errors[0]
    assert "reads --shots, --steps, --episodes, --lr, --seed" in errors[0] and not hyp.exists()

    def mse(seed: int) -> dict:
        args = ["evaluate", str(run), "--episodes", "3", "--shots", "5", "--steps", "1", "--seed", str(seed), "--json"]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)["mse"]

    assert mse(1) == mse(1) != mse(2)  # --seed picks the held-out sines


# -- value ranges of command-line flags -------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["finetune", "R", "--train", "t", "--output-dir", "o", "--grad-clip=-1"], "--grad-clip"),
    (["finetune", "R", "--train", "t", "--output-dir", "o", "--lr", "0"], "--lr"),
    (["finetune", "R", "--train", "t", "--output-dir", "o", "--max-steps", "0"], "--max-steps"),
    (["translate", "R", "--input", "i", "--output", "o", "--beam", "0"], "--beam"),
    (["evaluate", "R", "--episodes", "0"], "--episodes"),
    (["evaluate", "R", "--lr", "-1"], "--lr"),
    (["compare", "--init", "a=R", "--data-root", "d", "--langs", "xa", "--out", "o", "--seeds", "0"], "--seeds"),
])
def test_out_of_range_flags_are_one_line_with_status_2(capsys, args, flag) -> None:
    rc, errors = cli(capsys, *args)
    assert rc == 2 and len(errors) == 1 and flag in errors[0]


# -- file-system errors and damaged files -------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_files(tmp_path: Path, capsys,
                                                                                    monkeypatch) -> None:
    from metanmt import files

    real_open = open
    manifests = []

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if Path(path).name == ".tmp-manifest.json":
            manifests.append(path)
            if len(manifests) == 2:  # the second checkpoint: the disk is full
                return FullDisk(handle)
        return handle

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    out = tmp_path / "run"
    rc, errors = sine(capsys, out)
    assert rc == 2 and len(errors) == 1 and "No space left on device" in errors[0]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.undo()
    assert sine(capsys, out, "--resume") == (0, [])  # space freed: the run continues


def test_atomic_write_removes_its_temporary_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    from metanmt import files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "x.json"
    target.write_text("old")
    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_truncated_model_file_is_named(run: Path, capsys) -> None:
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, errors = cli(capsys, "evaluate", run, "--episodes", "2")
    assert rc == 2 and len(errors) == 1 and "model.safetensors: truncated" in errors[0]
    weights.unlink()
    rc, errors = cli(capsys, "evaluate", run, "--episodes", "2")
    assert rc == 2 and "model.safetensors: missing" in errors[0]


def test_deleted_tokenizer_files_are_named_not_install_advice(tmp_path: Path) -> None:
    from metanmt.data import vocab as V

    texts = [f"{w} {v}" for w in "alpha beta gamma delta epsilon zeta eta theta".split() for v in "one two three four".split()]
    tokenizer = V.cached_vocab(texts * 5, 300, use_cache=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        folder = tmp_path / name
        V.save_tokenizer(tokenizer, folder)
        (folder / name).unlink()
        with pytest.raises(DataError, match=rf"{name}: missing") as info:
            V.load_tokenizer(folder)
        assert "sentencepiece" not in str(info.value)


# -- score agrees with the sacreBLEU command line -------------------------------------------------


@pytest.mark.skipif(shutil.which("sacrebleu") is None, reason="the sacrebleu command is not installed")
def test_score_equals_the_sacrebleu_command_line_on_edge_inputs(tmp_path: Path, capsys) -> None:
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_bytes("The cat sat on the mat.  \r\nHello   world\t\n\ufeffX\n\nÜnïcödé café ☕ \n".encode())
    ref.write_bytes("\ufeffThe cat sat on the mat.\nHello world\u2028\nX \u00a0\nnothing\nUnicode café ☕\n".encode())
    cmd = subprocess.run(["sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b"], capture_output=True, text=True)
    assert cmd.returncode == 0, cmd.stderr
    expected = json.loads(cmd.stdout)
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [round(got["bleu"], 1), round(got["chrf"], 1)] == expected
    ref.write_text("a\nb\n")  # different line counts: the command line fails, so does score
    assert subprocess.run(["sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu"], capture_output=True).returncode != 0
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref)]) == 2
