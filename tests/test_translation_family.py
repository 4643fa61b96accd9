"""TranslationFamily: episodes, loss, an exact MAML meta-gradient, save/load, validation, file suites."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from metanmt.data.vocab import BOS_ID, PAD_ID
from metanmt.errors import ConfigError, DataError
from metanmt.tasks.translation import IGNORE, TranslationFamily

L10N = Path(__file__).resolve().parents[2] / "shared" / "data" / "l10n"
TINY_MODEL = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 32,
              "dropout": 0.0, "max_positions": 64}
TASK = {"source": "cldr", "train_languages": ["de", "fr"], "dev_languages": ["ro"], "vocab_size": 400,
        "support_tokens": 120, "query_tokens": 80, "max_source_length": 32, "max_target_length": 32,
        "dev_finetune_steps": 2, "dev_finetune_tokens": 100, "dev_max_segments": 8, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("METANMT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def family(cache: Path) -> TranslationFamily:
    return TranslationFamily(TASK, TINY_MODEL)


@pytest.fixture(scope="module")
def model(family: TranslationFamily) -> torch.nn.Module:
    torch.manual_seed(0)
    return family.build_model()


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def rows(batch: dict[str, torch.Tensor]) -> set[tuple]:
    """Each pair of a batch as (source ids, target ids) without padding."""
    out = set()
    for src, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        out.add((tuple(src[mask.bool()].tolist()), tuple(labels[labels != IGNORE].tolist())))
    return out


# -- episodes ------------------------------------------------------------------------------------


def test_episodes_are_deterministic_disjoint_and_token_sized(family: TranslationFamily, model: torch.nn.Module) -> None:
    for step in range(5):
        a = family.sample_episode(np.random.default_rng([0, step, 0]))
        b = family.sample_episode(np.random.default_rng([0, step, 0]))
        assert a.task == b.task and a.task in ("de", "fr")
        for key in a.support:
            assert torch.equal(a.support[key], b.support[key]) and torch.equal(a.query[key], b.query[key])
        assert not rows(a.support) & rows(a.query)  # CLDR pairs are unique per language
        longest = TASK["max_target_length"]
        assert TASK["support_tokens"] - longest < family.token_count(a.support) <= TASK["support_tokens"]
        assert TASK["query_tokens"] - longest < family.token_count(a.query) <= TASK["query_tokens"]
        assert family.batch_size(a.support) == a.support["input_ids"].shape[0]
    tasks = {family.sample_episode(np.random.default_rng([1, s, 0])).task for s in range(20)}
    assert tasks == {"de", "fr"}


def test_batch_layout(family: TranslationFamily) -> None:
    batch = family.sample_episode(np.random.default_rng(3)).support
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == BOS_ID).all() and BOS_ID != PAD_ID  # docs/design.md, "The decoder start token"
    mask = labels != IGNORE
    assert torch.equal(dec[:, 1:][mask[:, 1:]], labels[:, :-1][mask[:, 1:]])  # teacher forcing: shifted right
    assert (dec[~mask] == PAD_ID).all()
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != PAD_ID)


def test_merge_batches_pads_to_the_longer(family: TranslationFamily) -> None:
    ep = family.sample_episode(np.random.default_rng(5))
    merged = family.merge_batches(ep.support, ep.query)
    assert family.batch_size(merged) == family.batch_size(ep.support) + family.batch_size(ep.query)
    assert family.token_count(merged) == family.token_count(ep.support) + family.token_count(ep.query)
    assert rows(merged) == rows(ep.support) | rows(ep.query)


def test_temperature_sampling(cache: Path) -> None:
    fam = TranslationFamily({**TASK, "train_languages": ["de", "fr"], "task_sampling": "temperature", "temperature": 1.0}, TINY_MODEL)
    sizes = np.array([len(fam.pairs("train", "de")), len(fam.pairs("train", "fr"))], dtype=float)
    assert np.allclose(fam.task_probabilities("train"), sizes / sizes.sum())
    hot = TranslationFamily({**TASK, "task_sampling": "temperature", "temperature": 1e6}, TINY_MODEL)
    assert np.allclose(hot.task_probabilities("train"), 0.5, atol=1e-4)


def _short_and_long_suite(root: Path) -> dict:
    """60 one-word pairs and 60 pairs of 12 words each: what an episode sampler must not skew."""
    import gzip

    words = "red green blue black white gray brown pink cyan gold navy teal".split()
    pairs = [(f"Wort{i}", f"word{i}") for i in range(60)]
    pairs += [(" ".join(f"w{i}{w}" for w in words), " ".join(f"{w}{i}" for w in words)) for i in range(60)]
    (root / "meta_train").mkdir(parents=True, exist_ok=True)
    text = "lang\tsrc\ten\torigin\n" + "".join(f"de\t{s}\t{e}\tt\n" for s, e in pairs)
    (root / "meta_train" / "de.tsv.gz").write_bytes(gzip.compress(text.encode()))
    return {"train_languages": ["de"], "vocab_size": 600, "support_tokens": 40, "query_tokens": 40,
            "max_source_length": 64, "max_target_length": 64, "max_new_tokens": 8}


def test_episode_order_tokens_sorts_by_subword_counts(tmp_path: Path, cache: Path) -> None:
    task = _short_and_long_suite(tmp_path)
    fam = TranslationFamily({**task, "episode_order": "tokens"}, TINY_MODEL, data_root=tmp_path)
    pairs = fam.pairs("train", "de")
    with fam.source_language("de"):
        encoded = fam.encode(pairs)
    keys = [(len(encoded[i][1]), len(encoded[i][0])) for i in fam.length_order("train", "de")]
    assert keys == sorted(keys)  # target tokens, then source tokens
    episode = fam.sample_episode(np.random.default_rng(0))
    assert not rows(episode.support) & rows(episode.query)


def test_token_counts_of_the_length_order_are_cached_per_tokenizer_and_text(tmp_path: Path, cache: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process on the same pool reads the counts instead of encoding it; another tokenizer,
    limit or text is another key; a damaged cache file is counted again."""
    from metanmt.tasks.translation import batching

    task = {**_short_and_long_suite(tmp_path), "episode_order": "tokens"}
    first = TranslationFamily(task, TINY_MODEL, data_root=tmp_path)
    order = first.length_order("train", "de").tolist()
    files = sorted((cache / "lengths").glob("*.npz"))
    assert len(files) == 1
    encoded: list[int] = []
    original = batching.encode
    monkeypatch.setattr(batching, "encode", lambda tok, pairs, *a: encoded.append(len(pairs)) or original(tok, pairs, *a))
    again = TranslationFamily(task, TINY_MODEL, data_root=tmp_path)
    assert again.length_order("train", "de").tolist() == order and encoded == [4]  # the key's probe only
    shorter = TranslationFamily({**task, "max_target_length": 4}, TINY_MODEL, data_root=tmp_path)
    shorter.length_order("train", "de")
    assert len(list((cache / "lengths").glob("*.npz"))) == 2
    with shorter.source_language("de"):
        truth = [(len(g), len(s)) for s, g in shorter.encode(shorter.pairs("train", "de"))]
    assert [truth[i] for i in shorter.length_order("train", "de")] == sorted(truth)
    files[0].write_bytes(b"damaged")
    encoded.clear()
    assert TranslationFamily(task, TINY_MODEL, data_root=tmp_path).length_order("train", "de").tolist() == order
    assert encoded == [4, len(first.pairs("train", "de"))]
    assert np.load(files[0])["source"].shape == (len(first.pairs("train", "de")),)


def test_episode_start_by_length_trains_on_every_pair_equally(tmp_path: Path, cache: Path) -> None:
    """A uniform start puts a one-word pair in far more episodes than a long one (its chance is
    ~1/length); a start drawn in proportion to length makes the chances equal, as in an epoch."""
    task = _short_and_long_suite(tmp_path)
    long_share = {}
    for start in ("uniform", "length"):
        fam = TranslationFamily({**task, "episode_order": "tokens", "episode_start": start}, TINY_MODEL, data_root=tmp_path)
        counts = {"short": 0, "long": 0}
        rng = np.random.default_rng(0)
        for _ in range(400):
            episode = fam.sample_episode(rng)
            for batch in (episode.support, episode.query):
                lengths = (batch["labels"] != IGNORE).sum(1)
                counts["long"] += int((lengths > 6).sum())
                counts["short"] += int((lengths <= 6).sum())
        long_share[start] = counts["long"] / (counts["long"] + counts["short"])
    assert long_share["uniform"] < 0.25  # the skew the default keeps for runs made before the key
    assert 0.4 < long_share["length"] < 0.6  # half the pairs are long: about half the pairs trained on


def test_episodes_never_wrap_from_the_longest_pairs_to_the_shortest(tmp_path: Path, cache: Path) -> None:
    """Near the end of the length order an episode is taken from the end backwards: a support batch of
    long pairs never meets a query batch of one-word pairs (the merged batch would pad them all)."""
    task = _short_and_long_suite(tmp_path)
    fam = TranslationFamily({**task, "episode_order": "tokens", "episode_start": "length"}, TINY_MODEL, data_root=tmp_path)
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(300):
        episode = fam.sample_episode(rng)
        support_long = bool(((episode.support["labels"] != IGNORE).sum(1) > 6).any())
        query_short = bool(((episode.query["labels"] != IGNORE).sum(1) <= 6).any())
        assert not (support_long and query_short)
        ends += support_long
    assert ends > 50  # episodes among the long pairs (and at the end of the order) were drawn
    legacy = TranslationFamily(task, TINY_MODEL, data_root=tmp_path)  # chars + uniform: the old wrap-around
    wrapped = [legacy.sample_episode(np.random.default_rng(s)) for s in range(300)]
    assert any(((e.support["labels"] != IGNORE).sum(1) > 6).any() and ((e.query["labels"] != IGNORE).sum(1) <= 6).any()
               for e in wrapped)


# -- loss and meta-gradient ----------------------------------------------------------------------


def test_loss_is_token_mean_cross_entropy(family: TranslationFamily, model: torch.nn.Module) -> None:
    batch = family.sample_episode(np.random.default_rng(0)).support
    model.eval()
    ours = family.loss(model, full_params(model), batch)
    reference = model(**batch).loss  # transformers' own loss with the same labels
    assert torch.allclose(ours, reference, atol=1e-6)
    metrics = family.metrics(model, full_params(model), batch)
    assert metrics["tokens"] == family.token_count(batch) and abs(metrics["loss"] - float(ours.detach())) < 1e-5


def test_maml_meta_gradient_matches_finite_differences(family: TranslationFamily) -> None:
    """One explicit SGD inner step, second order, through the Marian model in float64."""
    torch.manual_seed(1)
    fam = TranslationFamily(TASK, {**TINY_MODEL, "dtype": "float64", "attn_implementation": "eager"})
    model = fam.build_model().eval()
    episode = fam.sample_episode(np.random.default_rng(7))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("embed_positions" in n for n in names)  # frozen tables (docs/design.md, "Frozen positions")
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: t for n, t in full_params(model).items() if n not in theta}
    lr = 0.5

    def meta_objective(params: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        support = fam.loss(model, {**fixed, **params}, episode.support)
        grads = torch.autograd.grad(support, list(params.values()), create_graph=create_graph)
        adapted = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        return fam.loss(model, {**fixed, **adapted}, episode.query)

    meta_grad = torch.autograd.grad(meta_objective(theta, create_graph=True), list(theta.values()))
    meta_grad = dict(zip(theta, meta_grad))
    rng = torch.Generator().manual_seed(0)
    eps = 1e-5
    directions = [{n: torch.randn(t.shape, generator=rng, dtype=t.dtype) for n, t in theta.items()}]
    # the decoder start token's embedding row alone: zero gradient if it were the pad row (pitfall 3)
    only_bos = {n: torch.zeros_like(t) for n, t in theta.items()}
    only_bos["model.shared.weight"][BOS_ID] = torch.randn(theta["model.shared.weight"].shape[1], generator=rng, dtype=torch.float64)
    directions.append(only_bos)
    for v in directions:
        def at(sign: float) -> float:
            shifted = {n: (t.detach() + sign * eps * v[n]).requires_grad_(True) for n, t in theta.items()}
            return float(meta_objective(shifted, create_graph=False).detach())

        numeric = (at(1.0) - at(-1.0)) / (2 * eps)
        analytic = float(sum((meta_grad[n] * v[n]).sum() for n in theta))
        assert abs(analytic) > 1e-6
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


# -- save / load ----------------------------------------------------------------------------------


def test_save_load_identical_logits(family: TranslationFamily, model: torch.nn.Module, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    batch = family.sample_episode(np.random.default_rng(11)).query
    model.eval()
    family.save_model(model, tmp_path / "run")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh = TranslationFamily(TASK, TINY_MODEL)  # as an evaluation would: from the saved config
    loaded = fresh.load_model(tmp_path / "run").eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(loaded(**batch).logits, expected)
        auto = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "run"), attn_implementation="eager").eval()
        assert torch.equal(auto(**batch).logits, expected)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    assert tok("Montag").input_ids == family.tokenizer("Montag").input_ids
    assert fresh.encode(family.pairs("train", "de")[:3]) == family.encode(family.pairs("train", "de")[:3])
    assert auto.config.decoder_start_token_id == BOS_ID and auto.generation_config.decoder_start_token_id == BOS_ID


def test_validate_scores_without_side_effects(family: TranslationFamily, model: torch.nn.Module) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_state = torch.get_rng_state()
    model.train()
    result = family.validate(model, engine=None)
    assert {"score", "dev_bleu", "dev_chrf", "dev_loss", "dev_loss_zero_shot", "dev_bleu/ro"} <= set(result)
    assert result["score"] == result["dev_bleu"]
    assert model.training and torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert family.validate(model) == result  # fixed seed and data order: comparable across checkpoints
    hyps = family.translate(model, ["luni", "marți"], max_new_tokens=4)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)


def test_validation_warns_when_the_model_ignores_its_source(family: TranslationFamily, model: torch.nn.Module,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A model whose decoder never reads the encoder (here: cross-attention outputs zeroed) has the
    same dev NLL whatever the source: the gap is 0 and validation says so."""
    import copy

    deaf = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in deaf.named_parameters():
            if "encoder_attn.out_proj" in name or "encoder_attn.v_proj" in name:
                p.zero_()
            if "encoder_attn" in name:
                p.requires_grad_(False)  # the dev fine-tune must not revive it
    with caplog.at_level("WARNING"):
        result = family.validate(deaf)
    assert abs(result["dev_source_gap"]) < 1e-6
    assert "ignores its source" in caplog.text


# -- file-based suites ----------------------------------------------------------------------------


def _write_suite(root: Path) -> None:
    import gzip

    de = [(f"Wort {i}", f"word {i}") for i in range(40)]
    ro = [(f"cuvânt {i}", f"word {i}") for i in range(30)]
    for folder, lang, pairs in (("meta_train", "de", de), ("dev", "ro", ro[:10]), ("finetune", "ro.4k", ro[10:])):
        (root / folder).mkdir(parents=True, exist_ok=True)
        text = "lang\tsrc\ten\torigin\n" + "".join(f"{lang[:2]}\t{s}\t{e}\tt\n" for s, e in pairs)
        (root / folder / f"{lang}.tsv.gz").write_bytes(gzip.compress(text.encode()))
    moses = root / "moses"
    moses.mkdir(exist_ok=True)
    (moses / "train.de").write_text("".join(s + "\n" for s, _ in de), encoding="utf-8")
    (moses / "train.en").write_text("".join(e + "\n" for _, e in de), encoding="utf-8")


def test_file_suite_reads_splits_and_reports_missing_data(tmp_path: Path, cache: Path) -> None:
    _write_suite(tmp_path)
    task = {"train_languages": ["de"], "dev_languages": ["ro"], "vocab_size": 300, "support_tokens": 30, "query_tokens": 30,
            "max_source_length": 32, "max_target_length": 32, "max_new_tokens": 8}
    fam = TranslationFamily(task, TINY_MODEL, data_root=tmp_path)
    assert len(fam.pairs("train", "de")) == 40
    finetune, evaluation = fam.dev_sets("ro")
    assert len(finetune) == 20 and len(evaluation) == 10
    episode = fam.sample_episode(np.random.default_rng(0))
    assert not rows(episode.support) & rows(episode.query)

    moses = TranslationFamily({**task, "format": "moses", "train_path": "moses/train.{side}", "dev_languages": []}, TINY_MODEL, data_root=tmp_path)
    assert moses.pairs("train", "de") == fam.pairs("train", "de")

    with pytest.raises(DataError, match=r"meta_train/fi\.tsv\.gz: no such file"):
        TranslationFamily({**task, "train_languages": ["de", "fi"]}, TINY_MODEL, data_root=tmp_path).corpus("train")
    with pytest.raises(ConfigError, match="data.root"):
        TranslationFamily(task, TINY_MODEL).corpus("train")
    with pytest.raises(ConfigError, match="unknown key"):
        TranslationFamily({**task, "langs": ["de"]}, TINY_MODEL)
    with pytest.raises(ConfigError, match="max_positions"):
        TranslationFamily({**task, "max_source_length": 100}, TINY_MODEL)
    with pytest.raises(ConfigError, match="Moses pattern needs"):
        TranslationFamily({**task, "format": "moses"}, TINY_MODEL, data_root=tmp_path)


def test_l10n_suite(tmp_path: Path, family: TranslationFamily) -> None:
    if not L10N.is_dir():
        pytest.skip(f"the shared l10n corpus is not at {L10N}")
    from metanmt.config import load_config

    repo = Path(__file__).resolve().parents[1]
    family.tokenizer.save_pretrained(str(tmp_path / "vocab"))  # a small vocabulary: no 70 s training here
    cfg = load_config(repo / "configs" / "l10n_fomaml.yaml", [f"data.root={L10N}", f"task.vocab={tmp_path / 'vocab'}"])
    fam = TranslationFamily(cfg.task, cfg.model, cfg.data.root)
    assert fam.languages("train")[:3] == ["pt", "de", "es"] and len(fam.languages("train")) == 18
    assert {lang: len(fam.pairs("test", lang)) for lang in fam.languages("test")} == {"lv": 500, "fi": 500, "tr": 500, "ko": 500}
    finetune, evaluation = fam.dev_sets("ro")
    assert len(evaluation) == cfg.task["dev_max_segments"] and len(finetune) > 100
    episode = fam.sample_episode(np.random.default_rng(0), split="test")
    assert episode.task in ("lv", "fi", "tr", "ko") and not rows(episode.support) & rows(episode.query)
