"""Kill -9 and resume, atomic checkpoints, and one clear line for each user error."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metanmt.config import load_config
from metanmt.engine import checkpoint as ckpt
from metanmt.engine.trainer import MetaTrainer
from metanmt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
L10N = ROOT.parent / "shared" / "data" / "l10n"
SETS = ["train.steps=300", "train.save_every=25", "train.meta_batch_size=5", "train.trackers=[]",
        "model.hidden=[16, 16]", "optim.schedule=cosine", "train.log_every=1000"]


def meta_train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "metanmt", "meta-train", str(ROOT / "configs" / "sinusoid_maml.yaml"),
           "--output-dir", str(out), *[x for s in SETS for x in ("--set", s)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_bitwise_equal(tmp_path):
    whole = meta_train(tmp_path / "whole")
    victim = meta_train(tmp_path / "victim")
    deadline = time.time() + 600  # generous: on a loaded machine the first checkpoints come late
    while time.time() < deadline and victim.poll() is None:  # kill once a few checkpoints exist, mid-step
        found = ckpt.list_checkpoints(tmp_path / "victim")
        if len(found) >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]
    killed_at = ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "victim"))
    assert killed_at < 300, "the run finished before it was killed; the test proves nothing"
    resumed = meta_train(tmp_path / "victim", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "victim" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    cfg = load_config("configs/sinusoid_maml.yaml", ["train.steps=6", "train.save_every=3", "train.trackers=[]",
                                                     "model.hidden=[8]", "train.meta_batch_size=2"])
    trainer = MetaTrainer(cfg, tmp_path / "run")
    original = trainer.accelerator.save_state

    def dies_half_way(output_dir, **kwargs):
        if trainer.state.step == 6:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "custom_checkpoint_0.pkl").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while writing")
        return original(output_dir, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step_00000006").exists()  # the half-written one
    resumed = MetaTrainer(cfg, tmp_path / "run", resume=True)  # never picks the half-written one
    assert resumed.state.step == 3
    resumed.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003", "step_00000006"]
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step_00000006").exists()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metanmt", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["meta-train", "configs/sinusoid_maml.yaml", "--set", "algorithm.inner_stepz=2"], "algorithm.inner_stepz: unknown key"),
        (["meta-train", "configs/sinusoid_maml.yaml", "--set", "train.steps=ten"], "train.steps: expected an integer"),
        (["meta-train", "configs/sinusoid_maml.yaml", "--set", "algorithm.name=mamll"], "unknown algorithm 'mamll'"),
        (["meta-train", "configs/nope.yaml"], "configs/nope.yaml: no such file"),
        (["meta-train", "configs/sinusoid_maml.yaml", "--set", "suite=tasks/nope.yaml"], "task suite 'tasks/nope.yaml' not found"),
        (["meta-train", "configs/l10n_fomaml.yaml", "--set", "data.root=/nonexistent/l10n"], "/nonexistent/l10n"),
        (["meta-train", "configs/l10n_fomaml.yaml"], "data.root: not set"),
        (["meta-train", "configs/omniglot_maml_5w1s.yaml", "--set", "data.root=/nonexistent/omni", "--set", "suite=tasks/omniglot_small1.yaml"], "/nonexistent/omni"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    proc = run_cli(*args, "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists(), "a failed start must not create the run directory"


@pytest.mark.skipif(not L10N.is_dir(), reason=f"shared l10n corpus not found at {L10N} (CI has it beside the checkout)")
def test_unknown_language_in_the_l10n_suite_is_named(tmp_path):
    proc = run_cli("meta-train", "configs/l10n_fomaml.yaml", "--set", f"data.root={L10N}", "--set",
                   "task.train_languages=[de, xx]", "--set", "task.vocab_size=600", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "xx" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest"])
def test_resume_skips_a_damaged_latest_checkpoint_and_ends_bitwise_equal(tmp_path, damage, caplog, monkeypatch):
    sets = ["train.steps=6", "train.save_every=2", "train.trackers=[]", "model.hidden=[8]", "train.meta_batch_size=2",
            "train.keep_checkpoints=5", "optim.schedule=cosine"]
    cfg = load_config("configs/sinusoid_maml.yaml", sets)
    MetaTrainer(cfg, tmp_path / "whole").train()
    victim = MetaTrainer(cfg, tmp_path / "run")
    original = victim.meta_step

    def dies_at_4(step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(step)

    monkeypatch.setattr(victim, "meta_step", dies_at_4)
    with pytest.raises(KeyboardInterrupt):
        victim.train()
    latest = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert ckpt.checkpoint_problem(latest) is None
    weights = next(p for p in sorted(latest.iterdir()) if p.name.startswith("custom_checkpoint_0"))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing":
        weights.unlink()
    else:
        (latest / ckpt.MANIFEST).unlink()  # a checkpoint whose writing stopped before its manifest
        (latest / "trainer_state.json").unlink()
    resumed = MetaTrainer(cfg, tmp_path / "run", resume=True)
    assert resumed.state.step == 2
    assert "skipping" in caplog.text and "step_00000004" in caplog.text
    resumed.train()
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_no_complete_checkpoint_is_one_clear_error(tmp_path):
    from metanmt.errors import UserError

    cfg = load_config("configs/sinusoid_maml.yaml", ["train.steps=2", "train.save_every=2", "train.trackers=[]",
                                                     "model.hidden=[8]", "train.meta_batch_size=2"])
    MetaTrainer(cfg, tmp_path / "run").train()
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{")
    with pytest.raises(UserError, match=r"no complete checkpoint to resume from .*step_00000002 \(trainer_state.json has"):
        MetaTrainer(cfg, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "model.safetensors").is_file()  # nothing of the run was given back


# -- write failures that a library reports as something else -----------------------------------------

LIBRARY_WRITES = """
import json, sys
import torch
from safetensors.torch import save_file
from metanmt import files

tensors = {"w": torch.zeros(4096)}
found = {}
for name, write in (("torch.save", lambda p: torch.save(tensors, p)), ("safetensors", lambda p: save_file(tensors, p))):
    path = f"{sys.argv[1]}/{name}.bin"
    try:
        with files.library_write(path):
            write(path)
        found[name] = None
    except Exception as exc:
        found[name] = [type(exc).__name__, getattr(exc, "errno", None), getattr(exc, "filename", None),
                       type(exc.__cause__).__name__]
print(json.dumps(found))
"""


def limited_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_torch_save_and_safetensors_write_failures_become_the_os_error_they_are(tmp_path):
    """Under a file-size limit torch.save raises a RuntimeError ("unexpected pos ...", no errno) and
    safetensors a SafetensorError ("File too large (os error 27)"); both become OSError(EFBIG, file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LIBRARY_WRITES, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=limited_file_size(8000))  # the tensors take 16 KB
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert found["torch.save"] == ["OSError", errno.EFBIG, str(tmp_path / "torch.save.bin"), "RuntimeError"]
    assert found["safetensors"] == ["OSError", errno.EFBIG, str(tmp_path / "safetensors.bin"), "SafetensorError"]


def test_a_full_disk_behind_torch_saves_runtime_error_is_named(tmp_path, monkeypatch):
    from metanmt import files

    target = tmp_path / "last.pt"
    target.write_bytes(b"part of a checkpoint")
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    space = {"free": 0}
    monkeypatch.setattr(files.os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=space["free"], f_frsize=4096))
    error = files.write_failure(torch_error, target)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and error.filename == str(target)
    assert files.os_error_line(error).startswith(f"{target}: No space left on device (free some space")
    space["free"] = 1 << 20  # 4 GiB free: not a full disk, but still a write that failed: said so, with what to check
    error = files.write_failure(torch_error, target)
    assert isinstance(error, UserError) and str(error).startswith(f"{target}: could not be written (PyTorch: ")
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors' text
    assert files.write_failure(rust, target).errno == errno.ENOSPC
    assert files.write_failure(RuntimeError("shape mismatch"), target) is None  # not a write failure: a bug, traceback
