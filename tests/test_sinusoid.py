"""The sinusoid family end to end: the CLI, evaluation, the figure, and MAML beating pretraining."""

import json

import numpy as np
import pytest

from metanmt.cli import main
from metanmt.engine.run import load_run
from metanmt.evaluation.few_shot import mean_ci95
from metanmt.evaluation.sinusoid import evaluate_sinusoid
from metanmt.tasks.sinusoid import SinusoidFamily


def test_episodes_follow_the_paper_ranges_and_are_reproducible():
    family = SinusoidFamily({"shots": 5, "query": 9}, {}, None)
    a = family.sample_episode(np.random.default_rng(3))
    b = family.sample_episode(np.random.default_rng(3))
    assert a.task == b.task and all((x == y).all() for x, y in zip(a.support, b.support))
    assert a.support[0].shape == (5, 1) and a.query[0].shape == (9, 1)
    xs = np.concatenate([family.sample_episode(np.random.default_rng(i)).support[0].numpy() for i in range(200)])
    assert xs.min() >= -5 and xs.max() <= 5
    amps = [float(family.sample_episode(np.random.default_rng(i)).task.split(",")[0][2:]) for i in range(200)]
    assert 0.1 <= min(amps) and max(amps) <= 5.0


def test_mean_ci95():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # Student t with 3 degrees of freedom (3.182), not the normal 1.96: the interval says n
    assert mean == 2.5 and half == pytest.approx(3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-6)


def test_cli_trains_evaluates_and_plots(tmp_path, capsys):
    common = ["--set", "train.steps=6", "--set", "train.meta_batch_size=2", "--set", "train.trackers=[]", "--set", "train.save_every=3"]
    assert main(["meta-train", "configs/sinusoid_maml.yaml", "--output-dir", str(tmp_path / "maml"), *common]) == 0
    assert main(["meta-train", "configs/sinusoid_pretrain.yaml", "--output-dir", str(tmp_path / "pre"), *common]) == 0
    # a second meta-train into the same directory is refused with one line
    assert main(["meta-train", "configs/sinusoid_maml.yaml", "--output-dir", str(tmp_path / "maml"), *common]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["meta-train", "configs/sinusoid_maml.yaml", "--output-dir", str(tmp_path / "maml"), "--resume",
                 *common, "--set", "train.steps=8"]) == 0
    assert load_run(tmp_path / "maml").cfg.train.steps == 8
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "maml"), "--shots", "5", "10", "--steps", "1", "3", "--episodes", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["mse"]) == {"5", "10"} and set(result["mse"]["5"]) == {"0", "1", "3"}
    assert result["episodes"] == 20
    assert main(["plot-sinusoid", str(tmp_path / "maml"), str(tmp_path / "pre"), "--out", str(tmp_path / "sine.png")]) == 0
    assert (tmp_path / "sine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "not a metanmt run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_short_maml_run_adapts_far_better_than_pretraining(tmp_path):
    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    sets = ["train.steps=1000", "train.meta_batch_size=10", "optim.lr=0.003", "train.trackers=[]", "train.save_every=1000"]
    results = {}
    for name in ["maml", "pretrain"]:
        MetaTrainer(load_config(f"configs/sinusoid_{name}.yaml", sets), tmp_path / name).train()
        results[name] = evaluate_sinusoid(load_run(tmp_path / name), shots=[5], steps=[10], episodes=200)["mse"]["5"]
    assert results["maml"]["10"] < 0.6 * results["pretrain"]["10"], results
    assert results["maml"]["10"] < 0.6 * results["maml"]["0"], "MAML's initialization should adapt"


def test_the_table_keeps_the_median_beside_the_mean(monkeypatch):
    """One sine whose adaptation diverges moves the mean, not the median (both are reported)."""
    from types import SimpleNamespace

    import metanmt.evaluation.sinusoid as sinusoid

    per_sine = [0.1, 0.2, 0.3, 0.4, 1000.0]
    monkeypatch.setattr(sinusoid, "adaptation_curve",
                        lambda inner, model, tasks, record: {s: {"mse": list(per_sine)} for s in record})
    run = SimpleNamespace(family=SimpleNamespace(sample_episode=lambda *a, **k: None), model=None,
                          inner_loop=lambda steps, lr: SimpleNamespace(lr=0.01))
    table = sinusoid.evaluate_sinusoid(run, shots=[5], steps=[1], episodes=5)
    assert table["mse"]["5"]["1"] == pytest.approx(200.2)
    assert table["median"]["5"]["1"] == pytest.approx(0.3)
