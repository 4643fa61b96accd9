"""MetaNMT's language embeddings and universal lexical representation on tiny Marian models:
reset semantics, exact meta-gradients through the language table, a new language at fine-tuning,
the save/load round trip, the ULR's definition and user-supplied word vectors, distributed equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from metanmt.adaptation.finetune import Finetuner, FinetuneRecipe, open_translation_model
from metanmt.config import AlgorithmConfig, load_config
from metanmt.data.corpus import Pair
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.inner import InnerLoop, select_names
from metanmt.engine.run import load_run
from metanmt.engine.trainer import MetaTrainer, build_family
from metanmt.errors import ConfigError
from metanmt.tasks import language_embeddings as lang_emb
from metanmt.tasks.translation.model import forward as logits_of
from tests.conftest import check_directional_derivatives
from tests.test_translation_engine import TINY

TABLE = "model.encoder.language_embeddings.tables."
ON = ["model.language_embeddings.enabled=true"]
ULR = ["model.language_embeddings.ulr.enabled=true", "model.language_embeddings.ulr.num_keys=40",
       "model.language_embeddings.ulr.dim=8"]


@pytest.fixture(autouse=True)
def vocab_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path_factory.getbasetemp() / "vocab-cache"))


def tiny(algo: str, *extra: str):
    return load_config("configs/quickstart.yaml", [*TINY, f"algorithm.name={algo}", "train.save_every=100",
                                                   "algorithm.inner_lr=0.1", *extra])


def table(model, slot: str = "episode") -> torch.Tensor:
    return lang_emb.find(model).tables[slot]


# -- reset semantics ------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["fomaml", "maml"])
def test_every_episode_starts_each_episode_at_zero_and_the_outer_step_never_touches_the_table(tmp_path, algo):
    cfg = tiny(algo, *ON, *ULR, "algorithm.inner_steps=2", "train.steps=3", "train.meta_batch_size=3")
    trainer = MetaTrainer(cfg, tmp_path / "run")
    name = TABLE + "episode"
    assert trainer.episode_only == {name}
    assert name in trainer.adapt_names and name not in trainer.meta_params()
    assert all(p is not table(trainer.model) for g in trainer.optimizer.param_groups for p in g["params"])
    seen: list[float] = []
    loss = trainer.family.loss

    def spy(model, params, batch):
        seen.append(float(params[name].detach().abs().max()))
        assert "lang_ids" in batch
        return loss(model, params, batch)

    trainer.family.loss = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for step in range(3):
        assert torch.count_nonzero(table(trainer.model)) == 0  # zero at the start of every step
        trainer.meta_step(step, log=False)  # a logging step adds one query pass per episode (at the initialization)
        assert torch.count_nonzero(table(trainer.model)) == 0  # and after every outer step
    # every episode: support step 1 (at zero), support step 2, query; the last two see an adapted table
    assert len(seen) == 3 * 3 * 3
    assert seen[0::3] == [0.0] * 9
    assert all(v > 0 for v in seen[1::3]) and all(v > 0 for v in seen[2::3])
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.shared.weight" in changed and "model.encoder.language_embeddings.ulr.A" in changed
    assert name not in changed


def test_every_step_updates_the_table_in_the_outer_step_then_zeroes_it(tmp_path):
    trainer = MetaTrainer(tiny("fomaml", *ON, "model.language_embeddings.reset=every_step", "train.steps=2"), tmp_path / "r")
    name = TABLE + "episode"
    assert trainer.episode_only == set() and name in trainer.meta_params()
    updated = []
    step = trainer.optimizer.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        updated.append(float(table(trainer.model).detach().abs().max()))  # after the outer update, before the reset
        return out

    trainer.optimizer.step = recording
    for s in range(2):
        trainer.meta_step(s)
        assert torch.count_nonzero(table(trainer.model)) == 0
    assert all(v > 0 for v in updated)


def test_never_keeps_one_learned_table_per_language(tmp_path):
    trainer = MetaTrainer(tiny("multitask", *ON, "model.language_embeddings.reset=never", "train.steps=4",
                               "optim.warmup_steps=0"), tmp_path / "r")
    module = lang_emb.find(trainer.model)
    assert set(module.tables) == set(lang_emb.family_languages(trainer.family)) >= {"de", "fr", "es", "ro"}
    trainer.train()
    learned = {lang for lang in module.tables if torch.count_nonzero(module.tables[lang])}
    assert learned and learned <= {"de", "fr", "es"}  # ro (dev only) never trained
    assert torch.count_nonzero(module.tables["ro"]) == 0


def test_multitask_with_every_episode_gives_the_table_no_update(tmp_path):
    trainer = MetaTrainer(tiny("multitask", *ON, "train.steps=2"), tmp_path / "r")
    trainer.train()
    assert torch.count_nonzero(table(trainer.model)) == 0
    assert TABLE + "episode" not in trainer.meta_params()


# -- exact meta-gradients through the language table ------------------------------------------------


@pytest.mark.parametrize("reset", ["every_episode", "never"])
def test_maml_meta_gradient_through_the_language_table_matches_finite_differences(reset):
    """float64, 2 SGD inner steps adapting the table, embeddings + encoder; with ``every_episode`` the
    table starts at zero and is not a meta-parameter (its influence reaches the shared parts through
    the inner loop); with ``never`` the table is a meta-parameter like the others."""
    cfg = tiny("maml", "model.dtype=float64", *ON, *ULR, f"model.language_embeddings.reset={reset}")
    family = build_family(cfg)
    torch.manual_seed(0)
    model = family.build_model()
    episode = family.sample_episode(np.random.default_rng(5))
    slot = "episode" if reset != "never" else episode.task
    torch.manual_seed(1)
    if reset == "never":  # a table that has learned something: the derivative is not taken at zero
        with torch.no_grad():
            table(model, slot).normal_(0, 0.02)
    excluded = lang_emb.episode_only_names(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in excluded}
    assert (TABLE + slot in params) == (reset == "never")
    adapt = select_names(model, ["model.shared.*", "model.encoder.*"])
    assert TABLE + slot in adapt and "model.encoder.language_embeddings.ulr.A" in adapt
    inner = InnerLoop(family, model, adapt, steps=2, lr=0.5)
    grads = MAML(AlgorithmConfig(name="maml", inner_steps=2, inner_lr=0.5)).task_gradient(inner, params, episode, {}).grads
    assert set(grads) == set(params)

    def outer() -> float:
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return float(inner.loss(adapted, episode.query).detach())

    check_directional_derivatives(outer, params, grads, list(params), directions=2)
    if reset == "never":  # the table's own meta-gradient is part of what was checked, and not zero
        assert float(grads[TABLE + slot].abs().max()) > 0


# -- fine-tuning, storage --------------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["every_episode", "never"])
def test_finetune_on_a_language_never_seen_starts_from_a_zero_table(tmp_path, reset):
    cfg = tiny("fomaml", *ON, *ULR, f"model.language_embeddings.reset={reset}", "train.steps=3",
               "train.save_every=3", "optim.warmup_steps=0")
    MetaTrainer(cfg, tmp_path / "run").train()
    loaded = open_translation_model(tmp_path / "run")
    module = lang_emb.find(loaded.model)
    if reset == "never":
        assert "xx" not in module.tables
        assert any(torch.count_nonzero(t) for t in module.tables.values())  # the training languages' tables
    pairs = [Pair("guten Tag", "good day"), Pair("danke", "thank you"), Pair("ja", "yes"), Pair("nein", "no")]
    tuner = Finetuner(loaded.family, loaded.model, pairs, FinetuneRecipe(adapt="lang", max_steps=3, epochs=3, lr=1e-2),
                      tmp_path / "ft", run_config=loaded.run_config, lang="xx")
    slot = "xx" if reset == "never" else "episode"
    assert module.active == "xx"
    assert torch.count_nonzero(module.tables[slot]) == 0
    assert tuner.names == [TABLE + slot]
    tuner.run()
    assert torch.count_nonzero(module.tables[slot]) > 0
    again = open_translation_model(tmp_path / "ft")
    restored = lang_emb.find(again.model)
    assert restored.active == "xx" and torch.equal(restored.tables[slot], module.tables[slot])
    # generate() goes through the same encoder hook: the tuned table changes the encoder's output
    encoder, batch = again.model.get_encoder(), again.family.collate(again.family.encode(pairs[:2]))
    with torch.no_grad():
        tuned_states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        with lang_emb.detached(again.model):
            plain_states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert not torch.allclose(tuned_states, plain_states)
    assert all(isinstance(t, str) for t in again.family.translate(again.model, ["guten Tag", "danke"]))


def test_save_load_round_trip_and_the_plain_model(tmp_path):
    cfg = tiny("fomaml", *ON, *ULR, "train.steps=2", "train.save_every=2")
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.train()
    family = trainer.family
    batch = family.sample_episode(np.random.default_rng([7, 0])).support
    trainer.model.eval()
    run = load_run(tmp_path / "run", double_backward=False)  # as fine-tuning and decoding load it
    with torch.no_grad():
        expected = logits_of(trainer.model, None, batch)
        assert torch.equal(logits_of(run.model, None, batch), expected)
    ours = dict(lang_emb.find(run.model).state_dict())
    for key, value in lang_emb.find(trainer.model).state_dict().items():
        assert torch.equal(ours[key], value), key
    # the plain model: the shared Marian weights, no language part and no universal part
    trained_with = trainer.model.config._attn_implementation  # bitwise comparisons need the same attention
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run", attn_implementation=trained_with).eval()
    assert not any("language_embeddings" in n for n, _ in plain.named_parameters())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        without_ulr = lang_emb.find(trainer.model).ulr
        lang_emb.find(trainer.model).ulr = None  # the episode table is zero: only the ULR term differs
        assert torch.equal(plain(**inputs).logits, logits_of(trainer.model, None, batch))
        lang_emb.find(trainer.model).ulr = without_ulr
        assert not torch.allclose(plain(**inputs).logits, expected)


def test_a_resumed_run_restores_the_tables_and_ulr(tmp_path):
    sets = [*ON, *ULR, "model.language_embeddings.reset=never", "train.steps=4", "train.save_every=2"]
    straight = MetaTrainer(tiny("fomaml", *sets), tmp_path / "a")
    straight.train()
    first = MetaTrainer(tiny("fomaml", *sets[:-2], "train.steps=2", "train.save_every=2"), tmp_path / "b")
    first.train()
    resumed = MetaTrainer(tiny("fomaml", *sets), tmp_path / "b", resume=True)
    resumed.train()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


# -- the universal lexical representation ----------------------------------------------------------


def test_ulr_definition_identity_A_tau_shape_and_gradients():
    torch.manual_seed(0)
    vocab, dq, keys, d = 12, 5, 7, 6
    q = lang_emb._normalize(torch.randn(1, vocab, dq, dtype=torch.float64))
    k = lang_emb._normalize(torch.randn(keys, dq, dtype=torch.float64))
    mask = torch.ones(1, vocab, dtype=torch.float64)
    mask[0, :4] = 0
    ulr = lang_emb.UniversalLexicalRepresentation(q, mask, ["*"], k, torch.randn(keys, d, dtype=torch.float64), 0.05)
    assert torch.equal(ulr.A, torch.eye(dq, dtype=torch.float64)) and ulr.tau == 0.05
    ids = torch.tensor([[1, 5, 6], [7, 8, 11]])
    out = ulr(ids, 0)
    assert out.shape == (2, 3, d)
    expected = torch.softmax(q[0][ids] @ k.T / 0.05, -1) @ ulr.values
    assert torch.allclose(out[:, 1:], expected[:, 1:]) and torch.allclose(out[1], expected[1])
    assert torch.count_nonzero(out[0, 0]) == 0  # a special token has no universal part
    out.square().sum().backward()
    assert ulr.A.grad is not None and float(ulr.A.grad.abs().max()) > 0
    assert float(ulr.values.grad.abs().max()) > 0
    # the gradient to A against central finite differences (float64)
    direction = torch.randn(dq, dq, dtype=torch.float64)
    with torch.no_grad():
        eps = 1e-6
        ulr.A.add_(eps * direction)
        up = float(ulr(ids, 0).square().sum())
        ulr.A.sub_(2 * eps * direction)
        down = float(ulr(ids, 0).square().sum())
        ulr.A.add_(eps * direction)
    assert float((ulr.A.grad * direction).sum()) == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_ulr_from_corpus_and_shared_vectors(tmp_path):
    for source in ("corpus", "shared"):
        family = build_family(tiny("fomaml", *ON, *ULR, f"model.language_embeddings.ulr.queries={source}"))
        model = family.build_model()
        ulr = lang_emb.find(model).ulr
        vocab = model.get_input_embeddings().weight.shape[0]
        assert ulr.groups == ["*"] and ulr.queries.shape[:2] == (1, vocab) and ulr.keys.shape[0] == 40
        assert torch.equal(ulr.A, torch.eye(ulr.keys.shape[1]))
        assert torch.count_nonzero(ulr.query_mask[0, :4]) == 0 and int(ulr.query_mask.sum()) > vocab // 2
        norms = ulr.keys.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def _write_vectors(path, words, vectors, header=True):
    lines = [f"{len(words)} {vectors.shape[1]}"] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in zip(words, vectors.tolist())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_user_supplied_word_vectors(tmp_path):
    """Queries from per-language word-vector files, keys from an English file: a word-initial piece
    whose word has a vector gets it as its query, attends to the key it equals, and a piece without a
    vector (or a special token) has no universal part; a new language's file is read at fine-tuning."""
    family = build_family(tiny("fomaml"))
    tok = family.tokenizer
    words = [t[1:] for t in tok.convert_ids_to_tokens(list(range(len(tok)))) if t.startswith("▁") and len(t) > 1]
    words = list({w.lower(): w for w in reversed(words)}.values())[::-1]  # no two differing only in case
    assert len(words) >= 16
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    _write_vectors(tmp_path / "en.vec", words[:16], keys)
    # German: its first 10 words get exactly the first 10 English keys (an "aligned" space)
    _write_vectors(tmp_path / "de.vec", words[:10], keys[:10], header=False)
    _write_vectors(tmp_path / "fr.vec", words[10:15], keys[10:15])
    _write_vectors(tmp_path / "zz.vec", words[:3], keys[5:8])
    sets = [*ON, "model.language_embeddings.ulr.enabled=true", "model.language_embeddings.ulr.queries=file",
            f"model.language_embeddings.ulr.query_vectors={tmp_path}/{{lang}}.vec",
            f"model.language_embeddings.ulr.key_vectors={tmp_path}/en.vec", "model.language_embeddings.ulr.num_keys=16"]
    family = build_family(tiny("fomaml", *sets))
    model = family.build_model()
    ulr = lang_emb.find(model).ulr
    assert ulr.groups == ["de", "fr"]  # es and ro have no file: no universal part for them
    de = ulr.groups.index("de")
    piece = tok.convert_tokens_to_ids("▁" + words[3])
    assert float(ulr.query_mask[de, piece]) == 1.0
    assert float(ulr.query_mask[ulr.groups.index("fr"), piece]) == 0.0
    weights = ulr.attention(torch.tensor([[piece]]), de)[0, 0]
    assert int(weights.argmax()) == 3 and float(weights[3]) > 0.5
    # every word-initial piece whose word (or its lowercase form) has a vector, and no other
    has_vector = {w.lower() for w in words[:10]}
    expected = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
                if i >= 4 and t.startswith("▁") and t[1:].lower() in has_vector]
    assert torch.nonzero(ulr.query_mask[de]).flatten().tolist() == expected
    # a value starts as the embedding of the piece spelling its key word
    assert torch.equal(ulr.values[3], model.get_input_embeddings().weight[piece])
    # a language met at fine-tuning reads its own vectors file
    lang_emb.set_language(model, "zz", family)
    assert ulr.groups[-1] == "zz" and int(ulr.query_mask[-1].sum()) == 3
    ids = torch.tensor([[piece, tok.convert_tokens_to_ids("▁" + words[0])]])
    assert lang_emb.find(model)._extra(ids, "zz") is not None
    with pytest.raises(ConfigError):
        lang_emb.LanguageEmbeddingConfig(enabled=True, ulr=lang_emb.ULRConfig(enabled=True, queries="file")).check()


def test_bad_word_vectors_name_the_file_and_line(tmp_path):
    from metanmt.errors import DataError

    (tmp_path / "bad.vec").write_text("a 1.0 2.0\nb 1.0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.vec:2"):
        lang_emb.read_word_vectors(tmp_path / "bad.vec")


# -- two processes equal one --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_with_language_embeddings(tmp_path, monkeypatch):
    from tests.test_distributed import ROOT, run

    monkeypatch.setenv("METANMT_CACHE", str(tmp_path / "vocab-cache"))
    config = str(ROOT / "configs" / "quickstart.yaml")
    sets = [*TINY, *ON, *ULR, "model.dropout=0.1", "train.steps=2", "train.meta_batch_size=3", "train.save_every=100",
            "train.eval_every=0", "optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=0", "algorithm.inner_steps=2"]
    single = run(tmp_path / "one", 1, config, sets)
    double = run(tmp_path / "two", 2, config, sets)
    for algo in ("maml", "fomaml", "reptile", "multitask"):
        assert double[algo]["world_size"] == 2, "accelerate did not start two processes"
        assert "model.encoder.language_embeddings.ulr.A" in single[algo]["params"]
        for name, g in single[algo]["grads"].items():
            assert torch.allclose(g, double[algo]["grads"][name], atol=1e-6, rtol=1e-4), (algo, name)
        for name, p in single[algo]["params"].items():
            assert torch.allclose(p, double[algo]["params"][name], atol=1e-6, rtol=1e-4), (algo, name)


@pytest.mark.parametrize("name", ["l10n_metanmt", "l10n_multitask_lang"])
def test_shipped_configs_validate_against_the_translation_schema(name):
    from metanmt.adaptation.recipe import ADAPT_PRESETS
    from metanmt.config import from_dict
    from metanmt.tasks.translation import TranslationModelConfig

    cfg = load_config(f"configs/{name}.yaml", ["data.root=/data"])
    model = from_dict(TranslationModelConfig, cfg.model, "model")
    le = model.language_embeddings
    assert le.enabled and le.reset == "every_episode" and le.ulr.enabled and le.ulr.tau == 0.05
    le.check()
    if cfg.algorithm.name != "multitask":
        assert cfg.algorithm.adapt == ADAPT_PRESETS["fast"]


def test_a_warm_start_with_language_embeddings_continues_from_them(tmp_path):
    sets = [*ON, *ULR, "model.language_embeddings.reset=never", "train.steps=2", "train.save_every=2"]
    first = MetaTrainer(tiny("multitask", *sets, "optim.warmup_steps=0"), tmp_path / "a")
    first.train()
    warm = MetaTrainer(tiny("fomaml", *sets, f"model.pretrained={tmp_path / 'a'}"), tmp_path / "b")
    saved, again = lang_emb.find(first.model), lang_emb.find(warm.model)
    for key, value in saved.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert again.languages[: len(lang_emb.family_languages(warm.family))] == lang_emb.family_languages(warm.family)
    with pytest.raises(ConfigError, match="warm start"):
        MetaTrainer(tiny("fomaml", *ON, *ULR, f"model.pretrained={tmp_path / 'a'}"), tmp_path / "c")
