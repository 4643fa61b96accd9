"""The engine on translation: every algorithm trains a tiny Marian model, checkpoints reload
with ``from_pretrained``, MAML through Marian is exact, and the quickstart runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from metanmt.cli import main
from metanmt.config import AlgorithmConfig, load_config
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.inner import InnerLoop, select_names, trainable_names
from metanmt.engine.run import load_run
from metanmt.engine.trainer import MetaTrainer

from .conftest import check_directional_derivatives

TINY = [
    "model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1", "model.attention_heads=2",
    "model.ffn_dim=64", "model.dropout=0.0", "model.max_positions=64",
    "task.train_languages=[de, fr, es]", "task.vocab_size=500", "task.support_tokens=150", "task.query_tokens=150",
    "task.max_source_length=24", "task.max_target_length=24", "task.max_new_tokens=8",
    "task.dev_finetune_steps=2", "task.dev_finetune_tokens=100", "task.dev_max_segments=6",
    "train.trackers=[]", "train.meta_batch_size=2",
]


@pytest.fixture(autouse=True)
def vocab_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path_factory.getbasetemp() / "vocab-cache"))


def tiny(algo: str, *extra: str):
    return load_config("configs/quickstart.yaml", [*TINY, f"algorithm.name={algo}", *extra])


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "multitask"])
def test_each_algorithm_lowers_the_loss_and_the_checkpoint_reloads(tmp_path, algo):
    lr = {"reptile": "optim.lr=1.0", "maml": "optim.lr=0.003"}.get(algo, "optim.lr=0.003")
    extra = ["optim.name=sgd"] if algo == "reptile" else []
    cfg = tiny(algo, "train.steps=12", "train.save_every=12", "optim.warmup_steps=0", "algorithm.inner_lr=0.05",
               "algorithm.inner_optimizer=adam" if algo == "reptile" else "algorithm.inner_steps=1",
               "algorithm.inner_steps=2", "model.attn_implementation=auto", lr, *extra)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    family = trainer.family
    probe = [family.sample_episode(np.random.default_rng([99, i]), split="train") for i in range(4)]
    batches = [family.merge_batches(e.support, e.query) for e in probe]

    def held_loss(model):
        with torch.no_grad():
            state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            return float(np.mean([family.loss(model, state, b).item() for b in batches]))

    before = held_loss(trainer.model)
    trainer.train()
    after = held_loss(trainer.model)
    assert after < before - 0.05, (before, after)

    # auto: second-order MAML trains with eager attention (sdpa on CPU has no double backward), the others with sdpa
    trained_with = trainer.model.config._attn_implementation
    assert trained_with == ("eager" if algo == "maml" else "sdpa")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run", attn_implementation=trained_with).eval()
    default = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run").eval()
    eager = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert tokenizer.get_vocab() == family.tokenizer.get_vocab()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batches[0]).logits
        assert torch.equal(model(**batches[0]).logits, expected)
        assert torch.allclose(default(**batches[0]).logits, expected, atol=1e-5)  # sdpa: same math, other rounding
        assert torch.allclose(eager(**batches[0]).logits, expected, atol=1e-5)
        assert torch.equal(load_run(tmp_path / "run", double_backward=algo == "maml").model(**batches[0]).logits, expected)


def test_maml_through_marian_matches_finite_differences(tmp_path):
    """Directional derivatives of the MAML outer loss (2 inner steps, float64) along random directions."""
    cfg = tiny("maml", "model.dtype=float64")
    from metanmt.engine.trainer import build_family

    family = build_family(cfg)
    torch.manual_seed(0)
    model = family.build_model().double()
    episode = family.sample_episode(np.random.default_rng(5))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapt = select_names(model, ["model.shared.*", "model.encoder.*"])
    inner = InnerLoop(family, model, adapt, steps=2, lr=0.5)
    grads = MAML(AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.5)).task_gradient(inner, params, episode, {}).grads

    def outer() -> float:
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return float(inner.loss(adapted, episode.query).detach())

    check_directional_derivatives(outer, params, grads, trainable_names(model))


@pytest.mark.slow
def test_quickstart_runs_end_to_end_in_reduced_form(tmp_path, capsys):
    out = tmp_path / "quick"
    sets = [x for s in TINY for x in ("--set", s)]
    args = ["meta-train", "configs/quickstart.yaml", "--output-dir", str(out), *sets,
            "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.save_every=2"]
    assert main(args) == 0
    assert (out / "best" / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    AutoModelForSeq2SeqLM.from_pretrained(out)
    assert main(["meta-train", "configs/quickstart.yaml", "--output-dir", str(out), *sets, "--resume",
                 "--set", "train.steps=6", "--set", "train.eval_every=2", "--set", "train.save_every=2"]) == 0
    assert load_run(out).cfg.train.steps == 6


def test_attention_is_eager_by_default_and_auto_follows_second_order(caplog):
    from metanmt.engine.algorithms.maml import FOMAML
    from metanmt.tasks.translation.config import TranslationModelConfig
    from metanmt.tasks.translation.model import attention

    assert MAML(AlgorithmConfig(name="maml")).double_backward
    assert not FOMAML(AlgorithmConfig(name="fomaml")).double_backward  # first-order: no double backward
    default = TranslationModelConfig()
    assert default.attn_implementation == "eager"  # the attention every committed result was made with
    assert attention(default, True) == attention(default, False) == "eager"
    auto = TranslationModelConfig(attn_implementation="auto")
    assert attention(auto, True) == "eager" and attention(auto, False) is None  # None: transformers' sdpa
    sdpa = TranslationModelConfig(attn_implementation="sdpa")
    assert attention(sdpa, False) == "sdpa"
    assert attention(sdpa, True) == "eager" and "no double backward" in caplog.text
