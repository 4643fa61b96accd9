"""Device tests (``pytest -m gpu``): they run where CUDA is present and are skipped elsewhere
(tests/conftest.py). bench/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metanmt.adaptation.finetune import Finetuner
from metanmt.adaptation.loading import open_translation_model
from metanmt.cli import main
from metanmt.config import AlgorithmConfig
from metanmt.data.corpus import read_pairs
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.inner import InnerLoop, select_names
from metanmt.engine.trainer import build_family

from .test_adaptation import corpus, recipe, run_dir, state, stop_after  # noqa: F401 (fixtures)
from .test_adapters import LORA, tiny

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def vocab_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path_factory.getbasetemp() / "vocab-cache"))


def test_finetune_resumes_exactly_on_cuda(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """Dropout draws from the CUDA generator there: its state is in the checkpoint too."""
    train = read_pairs(corpus / "finetune" / "xa.300.tsv.gz")
    dev = read_pairs(corpus / "dev" / "xa.tsv.gz")
    r = recipe(max_steps=9, eval_every=3, dev_metric="loss")

    def tuner(out: Path) -> Finetuner:
        loaded = open_translation_model(run_dir, "cuda")
        return Finetuner(loaded.family, loaded.model, train, r, out, dev, loaded.run_config, device="cuda")

    whole = tuner(tmp_path / "whole")
    expected = whole.run()

    stop_after(tuner(tmp_path / "killed"), 5)
    torch.cuda.manual_seed_all(12345)  # a resumed run must not depend on the generator state it finds
    resumed = tuner(tmp_path / "killed")
    got = resumed.run(resume=True)
    assert got["dev"] == expected["dev"]
    a, b = state(whole.model), state(resumed.model)
    assert next(iter(b.values())).device.type == "cuda"
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_maml_through_lora_on_cuda_matches_the_cpu():
    family = build_family(tiny("maml", "model.dtype=float64", *LORA))
    torch.manual_seed(0)
    model = family.build_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    episode = family.sample_episode(np.random.default_rng(5))
    algo = MAML(AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.5))

    def grads(device: str) -> dict[str, torch.Tensor]:
        m = model.to(device)
        params = {n: p for n, p in m.named_parameters() if p.requires_grad}
        ep = type(episode)(episode.task, family.to_device(episode.support, device), family.to_device(episode.query, device))
        inner = InnerLoop(family, m, select_names(m, ["*"]), steps=2, lr=0.5)
        return {n: g.cpu() for n, g in algo.task_gradient(inner, params, ep, {}).grads.items()}

    on_cpu, on_cuda = grads("cpu"), grads("cuda")
    assert all(torch.allclose(on_cpu[n], on_cuda[n], rtol=1e-8, atol=1e-10) for n in on_cpu)


def test_commands_run_on_cuda_with_bf16(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    assert main(["finetune", str(run_dir), "--train", str(corpus / "finetune" / "xa.100.tsv.gz"), "--dev",
                 str(corpus / "dev" / "xa.tsv.gz"), "--output-dir", str(out), "--max-steps", "3", "--max-tokens", "60",
                 "--dev-segments", "4", "--mixed-precision", "bf16"]) == 0
    src = tmp_path / "src.txt"
    src.write_text("nepo elif\nevas\n", encoding="utf-8")
    assert main(["translate", str(out), "--input", str(src), "--output", str(tmp_path / "hyp.txt"), "--beam", "2",
                 "--mixed-precision", "bf16"]) == 0
    assert len((tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["evaluate", str(out), "--test", str(corpus / "test" / "xa.tsv.gz"), "--beam", "1", "--json"]) == 0


def test_meta_training_on_cuda_reports_peak_device_memory_and_maml_uses_eager_attention(tmp_path):
    from metanmt.engine.checkpoint import read_history
    from metanmt.engine.trainer import MetaTrainer

    for algo, attention in (("maml", "eager"), ("fomaml", "sdpa")):
        trainer = MetaTrainer(tiny(algo, "train.log_every=1", "model.attn_implementation=auto"), tmp_path / algo)
        assert trainer.accelerator.device.type == "cuda"
        assert trainer.model.config._attn_implementation == attention
        trainer.train()
        records = read_history(tmp_path / algo, "train")
        assert records and all(r["peak_cuda_mb"] > 0 and r["peak_rss_mb"] > 0 for r in records)
