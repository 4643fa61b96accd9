"""Frozen parameters and LoRA adapters (peft) as the meta-parameters: what is trained, exactness of
MAML through LoRA, saving and loading base + adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from metanmt.config import AlgorithmConfig, load_config
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.inner import InnerLoop, select_names, trainable_names
from metanmt.engine.run import load_run
from metanmt.engine.trainer import MetaTrainer, build_family
from metanmt.errors import ConfigError

from .conftest import check_directional_derivatives
from .test_translation_engine import TINY

LORA = ["model.lora={r: 2, alpha: 4, dropout: 0.0, target_modules: [q_proj, v_proj, fc1]}"]


@pytest.fixture(autouse=True)
def vocab_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path_factory.getbasetemp() / "vocab-cache"))


def tiny(algo: str, *extra: str):
    return load_config("configs/quickstart.yaml", [*TINY, f"algorithm.name={algo}", "train.steps=2",
                                                    "train.save_every=2", "optim.warmup_steps=0", *extra])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batch_of(family, seed=3):
    episode = family.sample_episode(np.random.default_rng(seed))
    return family.merge_batches(episode.support, episode.query)


# -- model.freeze ---------------------------------------------------------------------------------
def test_frozen_parameters_are_neither_meta_learned_adapted_nor_fine_tuned(tmp_path):
    cfg = tiny("maml", "model.freeze=[model.decoder.layers.*, model.encoder.layers.0.fc1.*]", "optim.lr=0.01")
    trainer = MetaTrainer(cfg, tmp_path / "run")
    frozen = [n for n, _ in trainer.model.named_parameters()
              if n.startswith("model.decoder.layers.") or n.startswith("model.encoder.layers.0.fc1.")]
    assert frozen and not set(frozen) & set(trainer.meta_names) and not set(frozen) & set(trainer.adapt_names)
    assert not set(frozen) & {n for g in trainer.optimizer.param_groups for p in g["params"]
                              for n, q in trainer.model.named_parameters() if q is p}
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["model.encoder.layers.0.self_attn.q_proj.weight"],
                           after["model.encoder.layers.0.self_attn.q_proj.weight"])
    # the saved run reloads with the same parameters frozen; a fine-tune of everything leaves them alone
    run = load_run(tmp_path / "run")
    assert not any(p.requires_grad for n, p in run.model.named_parameters() if n in frozen)
    tuned = run.family.finetune(run.model, run.family.pairs("train", "de")[:40], steps=2, lr=0.01, max_tokens=100,
                                adapt=["*"])
    assert all(torch.equal(after[n], p) for n, p in tuned.named_parameters() if n in frozen)
    assert not torch.equal(after["model.encoder.layers.0.self_attn.q_proj.weight"],
                           dict(tuned.named_parameters())["model.encoder.layers.0.self_attn.q_proj.weight"])


def test_freeze_patterns_that_match_nothing_or_everything_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.freeze: pattern 'model\.encoderr\.\*' matches no parameter"):
        build_family(tiny("maml", "model.freeze=[model.encoderr.*]")).build_model()
    with pytest.raises(ConfigError, match=r"model\.freeze: .* freezes every parameter"):
        build_family(tiny("maml", "model.freeze=['*']")).build_model()


# -- LoRA -------------------------------------------------------------------------------------------
def test_maml_through_lora_matches_finite_differences():
    """The meta-gradient of the adapters (2 inner SGD steps, float64, LoRA dropout 0) along random
    directions against central differences; the base receives none."""
    family = build_family(tiny("maml", "model.dtype=float64", *LORA))
    torch.manual_seed(0)
    model = family.build_model()
    names = trainable_names(model)
    assert names and all(".lora_" in n for n in names)
    with torch.no_grad():  # B starts at zero; random B makes every second-order term non-zero
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    episode = family.sample_episode(np.random.default_rng(5))
    inner = InnerLoop(family, model, select_names(model, ["*"]), steps=2, lr=0.5)
    grads = MAML(AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.5)).task_gradient(inner, params, episode, {}).grads
    assert set(grads) == set(names)

    def outer() -> float:
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return float(inner.loss(adapted, episode.query).detach())

    check_directional_derivatives(outer, params, grads, names)


def test_lora_meta_training_saves_adapter_and_base_and_fine_tunes_the_adapters(tmp_path):
    from peft import PeftModel

    from metanmt.adaptation.finetune import finetune_run
    from metanmt.adaptation.recipe import FinetuneRecipe
    from .test_adaptation import write_tsv

    trainer = MetaTrainer(tiny("maml", "optim.lr=0.01", *LORA), tmp_path / "run")
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    lora = [n for n in after if ".lora_" in n]
    assert set(trainer.meta_names) == set(lora)
    assert all(torch.equal(before[n], after[n]) for n in after if n not in lora)  # the base is frozen
    assert any(not torch.equal(before[n], after[n]) for n in lora)
    run_dir = tmp_path / "run"
    # a config-built base exists nowhere else: saved alongside, referenced as "base"
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "base" / "config.json").is_file()
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    assert not (run_dir / "model.safetensors").exists()

    family, model = trainer.family, trainer.model.eval()
    batch = batch_of(family)
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(load_run(run_dir).model(**batch).logits, expected)
        # peft directly, and a plain model with the adapters merged in
        base = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "base", attn_implementation="eager")
        plain_peft = PeftModel.from_pretrained(base, str(run_dir)).eval()
        assert torch.equal(plain_peft(**batch).logits, expected)
        merged = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "base", attn_implementation="eager")
        merged = PeftModel.from_pretrained(merged, str(run_dir)).merge_and_unload().eval()
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)

    # the fine-tune adapts the adapters only, writes an adapter folder of its own, and reloads exactly
    write_tsv(tmp_path / "ro.tsv.gz", "ro", [(p.src, p.en) for p in family.pairs("train", "de")[:30]])
    recipe = FinetuneRecipe(adapt="all", lr=0.01, max_tokens=100, epochs=1, max_steps=3, dev_metric="loss")
    result = finetune_run(run_dir, tmp_path / "ro.tsv.gz", tmp_path / "ft", recipe, dev=tmp_path / "ro.tsv.gz")
    assert result["adapted_parameters"] == len(lora)
    out = tmp_path / "ft"
    assert (out / "adapter_config.json").is_file() and (out / "base" / "config.json").is_file()
    tuned = load_run(out).model
    tuned_params = snapshot(tuned)
    assert all(torch.equal(tuned_params[n], after[n]) for n in after if n not in lora)
    with torch.no_grad():
        base = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(out / "base", attn_implementation="eager"),
                                         str(out)).eval()
        assert torch.equal(base(**batch).logits, tuned(**batch).logits)
    # a plain transformers copy with the adapters merged
    from metanmt.tasks.translation.adapters import save_merged

    save_merged(tuned, tmp_path / "merged", family.save_model)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, tuned(**batch).logits, atol=1e-4)


def test_lora_on_a_pretrained_base_references_the_base_folder(tmp_path):
    family = build_family(tiny("multitask"))
    torch.manual_seed(0)
    family.save_model(family.build_model(), tmp_path / "base-model")
    cfg = tiny("multitask", f"model.pretrained={tmp_path / 'base-model'}", "optim.lr=0.01", *LORA)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.train()
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((tmp_path / "base-model").resolve())
    assert not (run_dir / "base").exists()
    batch = batch_of(trainer.family)
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
        # transformers follows the reference and applies the adapter (with the attention the run trained with)
        trained_with = trainer.model.config._attn_implementation
        loaded = AutoModelForSeq2SeqLM.from_pretrained(run_dir, attn_implementation=trained_with).eval()
        assert torch.equal(loaded(**batch).logits, expected)
        assert torch.equal(load_run(run_dir, double_backward=False).model(**batch).logits, expected)


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match=r"model\.lora\.r: must be at least 1"):
        build_family(tiny("maml", "model.lora={r: 0}")).build_model()
    with pytest.raises(ConfigError, match=r"model\.lora: .*nosuch"):
        build_family(tiny("maml", "model.lora={target_modules: [nosuch]}")).build_model()
