"""The sanity benchmark scripts (bench/sinusoid.py, bench/omniglot.py) end to end at toy sizes:
every recipe trains a few steps, results files are well formed, reruns resume and keep what
was there (other recipes, the error curve)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.test_omniglot import make_runs, omni_root  # noqa: F401  (omni_root is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sinusoid_recipes_write_results_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sinusoid = bench("sinusoid")
    out, runs, fig = tmp_path / "sinusoid.json", tmp_path / "runs", tmp_path / "sine.png"
    common = ["--runs", str(runs), "--out", str(out), "--figure", str(fig), "--episodes", "3",
              "--set", "train.meta_batch_size=2", "--set", "train.save_every=100"]
    sinusoid.main(["--steps", "3", *common])
    result = json.loads(out.read_text())
    recipes = list(sinusoid.RECIPES)
    assert {"maml", "pretrain", "maml_multistep", "metasgd_multistep"} <= set(recipes)
    assert result["meta_steps"] == {r: 3 for r in recipes}
    for r in recipes:
        assert set(result[r]) == {"5", "10", "20"} and all(set(row) == {"1", "5", "10"} for row in result[r].values())
        assert all(math.isfinite(v) and v >= 0 for row in result[r].values() for v in row.values())
        assert set(result[f"{r}_ci95"]) == {"5", "10", "20"}
        assert set(result[f"{r}_median"]["5"]) == {"1", "5", "10"}
        assert result["config"][r]["meta_steps"] == 3 and result["config"][r]["train_seconds"] >= 0  # 3 tiny steps may round to 0.0 s
        assert result["tables"][r].startswith("| K-shot |") and "95%" in result["config"][r]["interval"]
        assert (runs / r / "checkpoints").is_dir()
    assert result["config"]["metasgd_multistep"]["eval_inner_lr"] == "learned"
    assert result["config"]["maml_multistep"]["inner_steps"] == 5 and result["config"]["maml_multistep"]["multi_step_loss"]
    assert result["seconds"] == pytest.approx(sum(c["train_seconds"] for c in result["config"].values()), abs=0.2)
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sine_5shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every recipe at K=5

    # one recipe, more steps: it resumes at 3, the other recipes' entries stay as they were
    capsys.readouterr()
    sinusoid.main(["--only", "maml", "--steps", "5", "--no-figure", *common])
    assert f"resuming {runs / 'maml'} at meta-step 3" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["meta_steps"] == {**{r: 3 for r in recipes}, "maml": 5}
    assert again["pretrain"] == result["pretrain"] and again["maml"] != result["maml"]

    out.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        sinusoid.main(["--only", "pretrain", *common])
    assert exc.value.code == 2 and "not JSON" in capsys.readouterr().err


def test_omniglot_error_curve_selection_and_protocols(omni_root: Path, tmp_path: Path) -> None:  # noqa: F811
    omniglot = bench("omniglot")
    make_runs(omni_root, n_runs=2, n_classes=5)
    out, run_dir = tmp_path / "omniglot.json", tmp_path / "run"
    tiny = ["--set", "model.hidden=4", "--set", "model.blocks=2", "--set", "task.ways=5",
            "--set", "train.meta_batch_size=2", "--set", "train.save_every=100", "--set", "task.shift=2"]
    common = ["--data-root", str(omni_root), "--run-dir", str(run_dir), "--out", str(out), "--episodes", "4", *tiny]
    select = ["--select-eval", "--select-steps", "1", "2", "--select-lrs", "0.1", "0.4", "--select-episodes", "3"]
    omniglot.main(["--steps", "4", "--eval-every", "2", *select, *common])
    result = json.loads(out.read_text())
    assert [p[0] for p in result["error_curve"]] == [2, 4]
    assert all(0 <= p[1] <= 100 for p in result["error_curve"])
    assert result["meta_steps"] == 4 and "last checkpoint (meta-step 4)" in result["reported_checkpoint"]
    assert result["transductive"] is True and result["bn_policy"] == "batch"
    assert 0 <= result["non_transductive_error_pct"] <= 100 and "support set only" in result["non_transductive_protocol"]
    sel = result["eval_selection"]
    assert len(sel["grid"]) == 4 and sel["alphabets"] == ["Kappa", "Omega"]  # small2-only alphabets, never the runs
    assert (result["eval_inner_steps"], result["eval_inner_lr"]) == (sel["chosen"]["inner_steps"], sel["chosen"]["inner_lr"])
    assert result["train_task"]["shift"] == 2
    png = tmp_path / "omniglot_error_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun with a larger budget continues training and keeps the curve's earlier points
    omniglot.main(["--steps", "6", "--eval-every", "2", *common])
    again = json.loads(out.read_text())
    assert again["error_curve"][:2] == result["error_curve"] and [p[0] for p in again["error_curve"]] == [2, 4, 6]
    assert again["eval_selection"] is None and again["eval_settings_from"].startswith("the config")
    # scoring only: the curve comes from the run directory
    omniglot.main(["--eval-only", *common])
    assert json.loads(out.read_text())["error_curve"] == again["error_curve"]

    with pytest.raises(SystemExit) as exc:
        omniglot.main(["--eval-every", "-1", *common])
    assert exc.value.code == 2
