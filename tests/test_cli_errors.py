"""Nothing lost, nothing silently wrong: checks before any deletion, no output over an input, value
ranges of flags, file-system errors and damaged files as one line, folder locks. The CLI runs
in-process (``metanmt.cli.main``) on tiny sinusoid runs and tiny corpora the tests write."""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metanmt.cli import main
from metanmt.errors import DataError
from metanmt.locking import LOCK_FILE, _pid_space, _start_time

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


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: a run found "whole" has exactly these."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    out = tmp_path / "run"
    assert sine(capsys, out) == (0, [])
    return out


# -- --overwrite: everything is checked first, and only metanmt's own files are removed ----------


@pytest.mark.parametrize("bad", ["optim.lr=-1", "optim.betas=[0.9]", "train.steps=0", "train.meta_batch_size=0",
                                 "algorithm.name=mamll", "optim.grad_clip=-1", "task.shots=0", "task.amplitude=[5, 0.1]",
                                 "model.hidden=[0]"])
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
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".metanmt-")) == [".metanmt-files"]  # nothing aside


# -- --overwrite: the previous run is deleted only once the new one has a checkpoint ------------------


@pytest.mark.parametrize("failure", [DataError("a problem only training finds"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(run: Path, capsys, monkeypatch,
                                                                                 failure: BaseException) -> None:
    from metanmt.engine.trainer import MetaTrainer

    before = contents(run)
    started = []

    def fails(self, step: int, log=None) -> dict:
        started.append(sorted(p.name for p in run.iterdir()))
        raise failure

    monkeypatch.setattr(MetaTrainer, "meta_step", fails)
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            sine(capsys, run, "--overwrite", sets=("train.steps=6", "model.hidden=[4]"))
    else:
        rc, errors = sine(capsys, run, "--overwrite", sets=("train.steps=6", "model.hidden=[4]"))
        assert rc == 2 and len(errors) == 1 and "a problem only training finds" in errors[0]
    assert started and ".metanmt-replaced" in started[0]  # the new run had claimed the folder: the old one was aside
    assert contents(run) == before  # every file back, byte for byte; no lock, nothing aside
    monkeypatch.undo()
    assert sine(capsys, run, "--resume", sets=("train.steps=6",)) == (0, [])  # and it is the old run, resumable


def test_overwrite_is_final_once_the_new_run_has_a_checkpoint(run: Path, capsys, monkeypatch) -> None:
    from metanmt.engine.trainer import MetaTrainer

    original = MetaTrainer.meta_step

    def fails_at_3(self, step: int, log=None) -> dict:
        if step == 3:
            raise DataError("a problem at step 3")
        return original(self, step, log)

    monkeypatch.setattr(MetaTrainer, "meta_step", fails_at_3)
    rc, errors = sine(capsys, run, "--overwrite", sets=("train.steps=6", "model.hidden=[4]"))
    assert rc == 2 and "a problem at step 3" in errors[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # the new run's, not the old 2 and 4
    assert "hidden:\n  - 4" in (run / "metanmt.yaml").read_text() and not (run / ".metanmt-replaced").exists()


def kill_after_the_claim(out: Path, *sets: str) -> subprocess.CompletedProcess:
    """A process that claims ``out`` with --overwrite (the new run's config written, the old run aside)
    and is killed with SIGKILL before its first step: no handler of its own runs."""
    script = ("import os, signal\n"
              "from metanmt.config import load_config\n"
              "from metanmt.engine.trainer import MetaTrainer\n"
              f"cfg = load_config({str(ROOT / 'configs' / 'sinusoid_maml.yaml')!r}, {[*SINE, *sets]!r})\n"
              f"MetaTrainer(cfg, {str(out)!r}, overwrite=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("next_start", ["meta-train", "evaluate"])
def test_overwrite_killed_before_its_first_checkpoint_is_restored_by_the_next_start(run: Path, capsys, caplog,
                                                                                    next_start: str) -> None:
    before = contents(run)
    killed = kill_after_the_claim(run, "train.steps=6", "model.hidden=[4]")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / ".metanmt-replaced").is_dir() and (run / LOCK_FILE).is_file()  # killed mid-replacement
    assert "hidden:\n  - 4" in (run / "metanmt.yaml").read_text()  # the new run's config was written
    if next_start == "meta-train":  # a writer: restores, then refuses as it would have before the kill
        rc, errors = sine(capsys, run)
        assert rc == 2 and "already holds a run" in errors[0]
    else:  # a reader: restores, then reads the old run
        rc, errors = cli(capsys, "evaluate", run, "--episodes", "2")
        assert (rc, errors) == (0, [])
    assert "restored the previous contents" in caplog.text
    assert contents(run) == before


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


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny translation run (one multi-task step) and its corpus, with a test set for compare."""
    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    root = write_corpus(tmp_path_factory.mktemp("data"))
    (root / "test").mkdir()
    shutil.copy(root / "dev" / "xa.tsv.gz", root / "test" / "xa.tsv.gz")
    run = tmp_path_factory.mktemp("runs") / "run"
    MetaTrainer(load_config(None, [*TINY_TRANSLATION, f"data.root={root}"]), run).train()
    return run, root


def test_finetune_and_compare_overwrite_that_fail_before_their_first_checkpoint_keep_the_old_results(
        translation_run: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from metanmt.adaptation.finetune import Finetuner
    from metanmt.evaluation import compare

    run, root = translation_run
    ft = tmp_path / "ft"
    finetune = ["finetune", run, "--train", root / "finetune" / "xa.4k.tsv.gz", "--output-dir", ft, "--max-steps", "2",
                "--max-tokens", "40"]
    assert cli(capsys, *finetune) == (0, [])
    report = tmp_path / "report"
    comparison = ["compare", "--init", f"a={run}", "--data-root", root, "--langs", "xa", "--budgets", "0", "--seeds", "1",
                  "--no-scratch", "--beam", "1", "--curve", "--out", report]
    assert cli(capsys, *comparison) == (0, [])
    before_ft, before_report = contents(ft), contents(report)
    assert "finetune.json" in before_ft and "results.csv" in before_report

    def fails(*args, **kwargs):
        raise DataError("a problem before the first checkpoint")

    monkeypatch.setattr(Finetuner, "save_checkpoint", fails)
    monkeypatch.setattr(compare, "evaluate_model", fails)
    for command, out, before in ((finetune, ft, before_ft), (comparison, report, before_report)):
        rc, errors = cli(capsys, *command, "--overwrite")
        assert rc == 2 and len(errors) == 1 and "a problem before the first checkpoint" in errors[0]
        assert contents(out) == before, command[0]


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


def test_a_lock_from_another_host_is_refused_naming_its_owner_and_what_to_do(run: Path, capsys) -> None:
    lock = run / LOCK_FILE
    lock.write_text(json.dumps({"pid": 4242, "host": "build-node-7", "start": "123", "taken": "2024-05-01T10:00:00+02:00"}))
    before = contents(run)
    for extra in (["--resume"], ["--overwrite"]):
        rc, errors = sine(capsys, run, *extra, sets=("train.steps=6",))
        assert rc == 2 and len(errors) == 1, errors
        for part in (str(lock), "process 4242", "host 'build-node-7'", "since 2024-05-01T10:00:00+02:00",
                     "cannot be verified from this host", f"if it is known to be gone, delete {lock}"):
            assert part in errors[0], part
        assert contents(run) == before
    lock.write_text(json.dumps({"pid": 4242, "host": "build-node-7", "start": "123"}))  # written before `taken` existed:
    os.utime(lock, (1_700_000_000, 1_700_000_000))  # the lock file's time says when
    rc, errors = sine(capsys, run, "--resume", sets=("train.steps=6",))
    assert rc == 2 and "since 2023-11-1" in errors[0] and "cannot be verified" in errors[0]
    lock.unlink()  # what the error says to do once that process is known to be gone
    assert sine(capsys, run, "--resume", sets=("train.steps=6",)) == (0, [])


@pytest.mark.skipif(_pid_space() is None, reason="no boot id and pid namespace to compare (not Linux)")
def test_a_lock_under_another_host_name_is_checked_when_it_is_from_this_machine(run: Path, capsys, caplog) -> None:
    """A renamed host (or a name given as FQDN): same boot and pid namespace, so its pid can be checked."""
    lock = run / LOCK_FILE
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": "old-name", "start": _start_time(other.pid),
                                    "pids": _pid_space()}))
        rc, errors = sine(capsys, run, "--resume", sets=("train.steps=6",))
        assert rc == 2 and f"in use by process {other.pid} on old-name" in errors[0]
    finally:
        other.kill()
        other.wait()
    assert sine(capsys, run, "--resume", sets=("train.steps=6",)) == (0, [])  # its process is gone: stale
    assert "taking over a stale lock" in caplog.text and f"process {other.pid} is gone" in caplog.text


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
    (["--langs", "xa", "xa", "--budgets", "4k"], ["--langs: xa given twice"]),
    (["--langs", "xa", "--budgets", "4k", "4000"], ["--budgets: 4000 given twice (as 4k 4000)"]),
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


def file_size_limit(limit: int):
    """A subprocess's ``preexec_fn``: files may not grow past ``limit`` bytes, as on a disk that is
    full for them; SIGXFSZ ignored, so a write past it fails with EFBIG instead of killing the process."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_failure_inside_torch_save_is_one_line_and_leaves_the_previous_checkpoint(run: Path, capsys) -> None:
    """torch.save reports a failed write as a RuntimeError without an errno ("unexpected pos ..."),
    the same under a full disk as under a file-size limit; it must still be one line naming the file."""
    previous = run / "checkpoints" / "step_00000004"
    largest = max(p.stat().st_size for p in previous.iterdir())
    kept = {k: v for k, v in contents(run).items() if k not in ("metanmt.yaml", "history.jsonl")}  # rewritten by a resume
    cmd = [sys.executable, "-m", "metanmt", "meta-train", str(ROOT / "configs" / "sinusoid_maml.yaml"), "--output-dir",
           str(run), *[x for s in (*SINE, "train.steps=6") for x in ("--set", s)], "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(largest - 1))  # the next checkpoint's largest file cannot be written
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "File too large" in errors[0] and f"file-size limit of {largest - 1} bytes" in errors[0], errors
    named = Path(errors[0].split("error: ", 1)[1].split(": File too large")[0])
    assert named.parent == run / "checkpoints" / ".tmp-step_00000006", errors  # the file that could not be written
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]
    assert {k: v for k, v in contents(run).items() if k in kept} == kept  # the model and both checkpoints, byte for byte
    assert sine(capsys, run, "--resume", sets=("train.steps=6",)) == (0, [])  # the limit lifted: it continues from step 4
    assert (run / "checkpoints" / "step_00000006" / "manifest.json").is_file()


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
