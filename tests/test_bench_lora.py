"""bench/lora_meta_step.py's plumbing on tiny models (its numbers come from runs on an idle machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .test_adaptation import make_l10n, make_run

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_lora_meta_step", ROOT / "bench" / "lora_meta_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_timing_plumbing_on_a_tiny_model(tmp_path):
    out = tmp_path / "timing.json"
    args = ["timing", "--tiny", "--in-process", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    assert bench().main(args) == 0
    result = json.loads(out.read_text())
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora"} and all(r["algo"] == "maml" for r in rows.values())
    # full: every trainable tensor (not the frozen sinusoidal positions); lora: the adapters only
    assert 0 < rows["lora"]["meta_elements"] < rows["full"]["meta_elements"] < rows["full"]["model_elements"]
    assert rows["lora"]["model_elements"] > rows["full"]["model_elements"]  # the base plus the adapters
    assert all(r["ms_per_step"] > 0 and r["peak_mb"] >= r["peak_mb_before_steps"] > 0 for r in rows.values())
    assert set(result["comparison"]) >= {"lora_speedup", "lora_peak_mb_ratio", "lora_meta_elements_fraction"}


@pytest.mark.slow
def test_quality_plumbing_on_a_tiny_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path / "cache"))
    corpus = make_l10n(tmp_path / "l10n")
    base = make_run(corpus, tmp_path / "base")
    tiny = ["task.train_languages=[aa, bb]", "task.dev_languages=[xa]", "task.test_languages=[xa]", "task.dev_budget='100'",
            "task.support_tokens=120", "task.query_tokens=120", "task.max_source_length=24", "task.max_target_length=24",
            "task.max_new_tokens=8", "task.dev_finetune_steps=2", "task.dev_finetune_tokens=100", "task.dev_max_segments=4",
            "train.meta_batch_size=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
            "optim.warmup_steps=0"]
    out = tmp_path / "quality.json"
    args = ["quality", "--base", str(base), "--data-root", str(corpus), "--steps", "2", "--lora-r", "2", "--match",
            "seconds", "--calibration", "1", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert bench().main([*args, *(x for s in tiny for x in ("--set", s))]) == 0
    result = json.loads(out.read_text())
    meta, multi = result["runs"]["lora_maml"], result["runs"]["lora_multitask"]
    assert meta["step"] == 2 and multi["step"] >= 1 and result["equal_compute"]["by"] == "seconds"
    for info in (meta, multi):
        assert {"dev_bleu", "dev_chrf", "dev_loss", "dev_loss_zero_shot", "score"} <= set(info["dev"])
        assert (Path(info["run"]) / "adapter_config.json").is_file()
        saved = json.loads((Path(info["run"]) / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == str(base.resolve()) and saved["r"] == 2
