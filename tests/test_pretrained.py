"""Pretrained multilingual starting points: tiny random checkpoints of every supported architecture
(Marian, mBART-50, M2M100, NLLB, T5), with tokenizers made here from a SentencePiece model trained
on a few sentences (nothing is downloaded), meta-train, fine-tune, save, reload and translate into
English with the language codes each family expects."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metanmt.config import load_config
from metanmt.data.cldr import cldr_corpus
from metanmt.data.corpus import Pair
from metanmt.engine.inner import select_names, trainable_names
from metanmt.engine.trainer import MetaTrainer, build_family
from metanmt.errors import ConfigError, DataError
from metanmt.tasks.translation import TranslationFamily
from metanmt.tasks.translation.pretrained import LANGUAGE_CODES, family_of, sinusoidal_tables

ARCHS = ["marian", "mbart50", "m2m100", "nllb", "t5"]
LANGS = ["de", "fr", "ro"]
ENGLISH = {"mbart50": "en_XX", "m2m100": "__en__", "nllb": "eng_Latn"}
SIZES = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0)


def train_spm(texts: list[str], t5: bool = False) -> bytes:
    import sentencepiece as spm

    # fairseq's specials for mBART/M2M100/NLLB/Marian-style (<s> 0, <pad> 1, </s> 2, <unk> 3); T5's own
    ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if t5 else dict(bos_id=0, pad_id=1, eos_id=2, unk_id=3)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, model_type="unigram", vocab_size=150,
                                   hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2, **ids)
    return buffer.getvalue()


def make_checkpoint(arch: str, directory: Path, texts: list[str]) -> Path:
    """A random model of ``arch`` (d_model 16, 1+1 layers) and its tokenizer, saved like a Hub checkpoint."""
    import transformers as T

    directory.mkdir(parents=True)
    proto = train_spm(texts, t5=arch == "t5")
    if arch == "marian":  # opus-mt layout: source.spm, target.spm, vocab.json
        import sentencepiece as spm

        (directory / "source.spm").write_bytes(proto)
        (directory / "target.spm").write_bytes(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
        (directory / "vocab.json").write_text(json.dumps(vocab))
        tok = T.MarianTokenizer(str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json"))
        config = T.MarianConfig(vocab_size=len(tok), decoder_vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, forced_eos_token_id=None, **SIZES)
        model = T.MarianMTModel(config)
    elif arch == "t5":
        (directory / "spiece.model").write_bytes(proto)
        tok = T.T5Tokenizer.from_pretrained(str(directory))
        config = T.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                            num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T.T5ForConditionalGeneration(config)
    else:
        (directory / "sentencepiece.bpe.model").write_bytes(proto)
        if arch == "m2m100":  # M2M100Tokenizer: vocab.json (fairseq ids) + the SentencePiece model
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_proto=proto)
            vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
            for i in range(sp.get_piece_size()):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
            (directory / "vocab.json").write_text(json.dumps(vocab))
            tok = T.M2M100Tokenizer(str(directory / "vocab.json"), str(directory / "sentencepiece.bpe.model"))
            vocab_size = max(tok.lang_code_to_id.values()) + 1 + tok.num_madeup_words
        elif arch == "nllb":
            from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

            tok = T.NllbTokenizer.from_pretrained(str(directory))
            # converted from a bare SentencePiece model the codes are not pieces yet (a Hub NLLB has them)
            tok.add_tokens(list(FAIRSEQ_LANGUAGE_CODES), special_tokens=True)
            vocab_size = len(tok)
        else:
            tok = T.MBart50Tokenizer.from_pretrained(str(directory))
            vocab_size = len(tok)
        common = dict(vocab_size=vocab_size, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                      forced_eos_token_id=2, **SIZES)
        if arch == "mbart50":
            model = T.MBartForConditionalGeneration(T.MBartConfig(**common))
        else:  # NLLB is the M2M100 architecture with its own tokenizer
            model = T.M2M100ForConditionalGeneration(T.M2M100Config(**common))
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    corpus = cldr_corpus(LANGS)
    texts = [text for lang in LANGS for pair in corpus[lang][:400] for text in pair]
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    return {arch: make_checkpoint(arch, root / arch, texts) for arch in ARCHS}


def family_for(path: Path, **model) -> TranslationFamily:
    task = {"source": "cldr", "train_languages": ["de", "fr"], "dev_languages": ["ro"], "support_tokens": 60,
            "query_tokens": 60, "max_source_length": 24, "max_target_length": 24, "max_new_tokens": 6,
            "dev_finetune_steps": 1, "dev_finetune_tokens": 60, "dev_max_segments": 4}
    return TranslationFamily(task, {"pretrained": str(path), **model})


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_family_is_read_from_the_tokenizer(checkpoints, arch):
    family = family_for(checkpoints[arch])
    assert family_of(family.tokenizer) == ("plain" if arch == "marian" else arch)


@pytest.mark.parametrize("arch", ["mbart50", "m2m100", "nllb"])
def test_each_episode_gives_its_language_code_and_the_labels_start_in_english(checkpoints, arch):
    family = family_for(checkpoints[arch])
    model = family.build_model()
    tok = family.tokenizer
    en = token_id(tok, ENGLISH[arch])
    seen = set()
    for i in range(8):
        episode = family.sample_episode(np.random.default_rng([3, i]))
        code = LANGUAGE_CODES[arch][episode.task]
        code_id = tok.get_lang_id(code) if arch == "m2m100" else token_id(tok, code)
        for batch in (episode.support, episode.query):
            assert (batch["input_ids"][:, 0] == code_id).all()  # the language reaches the encoder
            assert (batch["labels"][:, 0] == en).all()  # labels: [en] tokens </s>
            assert (batch["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()  # </s> [en] tokens
            assert (batch["decoder_input_ids"][:, 1] == en).all()
        seen.add(episode.task)
    assert seen == {"de", "fr"}
    assert model.generation_config.forced_bos_token_id == en


def test_t5_gets_a_task_prefix_and_no_code(checkpoints):
    family = family_for(checkpoints["t5"])
    family.build_model()
    episode = family.sample_episode(np.random.default_rng(0))
    name = {"de": "German", "fr": "French"}[episode.task]
    text = family.tokenizer.decode(episode.support["input_ids"][0], skip_special_tokens=True)
    assert text.startswith(f"translate {name} to English"), text  # the tiny vocabulary has no ":"
    labels = episode.support["labels"][0]
    assert family.tokenizer.decode(labels[labels >= 0], skip_special_tokens=True).strip()  # plain English target


def test_codes_can_be_overridden_and_an_unknown_language_names_the_key(checkpoints):
    family = family_for(checkpoints["mbart50"], language_codes={"de": "fr_XX"})
    family.build_model()
    tok = family.tokenizer
    with family.source_language("de"):
        assert family.encode([Pair("Hallo", "Hello")])[0][0][0] == token_id(tok, "fr_XX")
    with family.source_language("hu"), pytest.raises(ConfigError, match=r"model\.language_codes\.hu"):
        family.encode([Pair("Jó reggelt", "Good morning")])
    with pytest.raises(ConfigError, match="source language"):  # a code family needs to be told the language
        family.encode([Pair("Hallo", "Hello")])
    bad = family_for(checkpoints["nllb"], language_codes={"de": "deu_Xxxx"})
    with bad.source_language("de"), pytest.raises(ConfigError, match="deu_Xxxx"):
        bad.encode([Pair("Hallo", "Hello")])


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_select_embeddings_and_encoder_by_role(checkpoints, arch):
    model = family_for(checkpoints[arch]).build_model()
    chosen = select_names(model, ["@embeddings", "@encoder"])
    encoder = {n for n, _ in model.get_encoder().named_parameters()}
    prefix = "" if arch == "t5" else "model."
    for name in trainable_names(model):
        inside = name.startswith((f"{prefix}shared.", f"{prefix}encoder."))
        assert (name in chosen) == inside, name
    assert len(chosen) >= len([n for n in encoder if "embed_positions" not in n and "embed_tokens" not in n])
    decoder_only = select_names(model, ["@decoder"])
    assert not any(n.startswith(f"{prefix}encoder.") for n in decoder_only)
    with pytest.raises(ConfigError, match="@nothing"):
        select_names(model, ["@nothing"])


@pytest.mark.parametrize("arch", ["marian", "m2m100", "nllb"])
def test_sinusoidal_positions_are_found_and_never_trained(checkpoints, arch, tmp_path):
    family = family_for(checkpoints[arch])
    model = family.build_model()
    tables = sinusoidal_tables(model)
    assert len(tables) == 2, tables  # encoder and decoder
    assert tables[0].endswith(".weight" if arch == "marian" else ".weights")
    assert not set(tables) & set(trainable_names(model))
    assert not set(tables) & set(select_names(model, ["*"]))
    family.save_model(model, tmp_path / "saved")  # reloaded (transformers 5 re-creates Marian's trainable)
    reloaded = family.load_model(tmp_path / "saved")
    assert not set(sinusoidal_tables(reloaded)) & set(trainable_names(reloaded))


@pytest.mark.parametrize("arch,algo", [(a, "fomaml") for a in ARCHS] + [("mbart50", "maml"), ("m2m100", "maml"), ("t5", "maml")])
def test_meta_train_finetune_save_reload_and_translate_into_english(checkpoints, arch, algo, tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    monkeypatch.setenv("METANMT_PROGRESS", "0")
    overrides = [
        f"model.pretrained={checkpoints[arch]}", "task.train_languages=[de, fr]", "task.dev_languages=[ro]",
        "task.support_tokens=60", "task.query_tokens=60", "task.max_source_length=24", "task.max_target_length=24",
        "task.max_new_tokens=6", "task.dev_finetune_steps=1", "task.dev_finetune_tokens=60", "task.dev_max_segments=4",
        f"algorithm.name={algo}", "algorithm.inner_steps=1", "algorithm.inner_lr=0.05", "algorithm.adapt=[\"@embeddings\", \"@encoder\"]",
        "optim.lr=0.003", "optim.warmup_steps=0", "train.steps=3", "train.save_every=3", "train.eval_every=3",
        "train.meta_batch_size=2", "train.trackers=[]",
    ]
    cfg = load_config("configs/quickstart.yaml", overrides)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    family = trainer.family
    state = lambda m: {**dict(m.named_parameters()), **dict(m.named_buffers())}  # noqa: E731
    before = {n: p.detach().clone() for n, p in state(trainer.model).items()}
    trainer.train()
    changed = {n for n, p in state(trainer.model).items() if not torch.equal(p, before[n])}
    assert changed >= set(select_names(trainer.model, ["@encoder"]))  # meta-learned
    assert not changed & set(sinusoidal_tables(trainer.model))  # frozen positions stay as they were

    # fine-tune on the held-out language, save, reload with from_pretrained
    pairs = family.pairs("dev", "ro")[:40]
    with family.source_language("ro"):
        family.finetune(trainer.model, pairs, steps=2, lr=1e-3, max_tokens=60, adapt=family.EMBEDDINGS_AND_ENCODER)
    family.save_model(trainer.model, tmp_path / "tuned")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "tuned", attn_implementation="eager").eval()
    other = build_family(cfg)
    loaded = other.load_model(tmp_path / "tuned")
    batch = family.collate(_encoded(family, pairs[:4], "ro"))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert torch.allclose(reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, expected, atol=1e-5)
        assert torch.allclose(loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, expected, atol=1e-5)

    # translate: forced into English (the first generated token after the start is the English code)
    with other.source_language("ro"):
        hyps = other.translate(loaded, [p.src for p in pairs[:3]])
        encoded = other.encode(pairs[:3])
    assert len(hyps) == 3 and all(isinstance(h, str) for h in hyps)
    with torch.no_grad():
        out = reloaded.generate(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], max_new_tokens=4)
    assert int(out[0, 0]) == reloaded.config.decoder_start_token_id
    if arch in ENGLISH:
        assert int(out[0, 1]) == token_id(other.tokenizer, ENGLISH[arch])
        code = LANGUAGE_CODES[arch]["ro"]
        code_id = other.tokenizer.get_lang_id(code) if arch == "m2m100" else token_id(other.tokenizer, code)
        assert encoded[0][0][0] == code_id


def _encoded(family, pairs, lang):
    with family.source_language(lang):
        return family.encode(pairs)


def test_a_hub_name_goes_to_from_pretrained_and_a_missing_one_is_a_clear_error(monkeypatch):
    import transformers

    seen = []

    def fake(name, **kwargs):
        seen.append((name, kwargs))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", fake)
    from metanmt.tasks.translation.config import TranslationModelConfig
    from metanmt.tasks.translation.model import load_pretrained

    with pytest.raises(DataError, match=r"model\.pretrained: cannot load 'facebook/nllb-200-distilled-600M'"):
        load_pretrained("facebook/nllb-200-distilled-600M", TranslationModelConfig(pretrained="facebook/nllb-200-distilled-600M"))
    assert seen[0][0] == "facebook/nllb-200-distilled-600M" and "local_files_only" not in seen[0][1]


def test_the_cli_translates_a_multilingual_checkpoint_given_the_source_language(checkpoints, tmp_path, capsys, monkeypatch):
    from metanmt.cli import main

    monkeypatch.setenv("METANMT_PROGRESS", "0")
    source = tmp_path / "src.txt"
    source.write_text("Germană\nFranceză\n", encoding="utf-8")
    assert main(["translate", str(checkpoints["m2m100"]), "--input", str(source), "--output", str(tmp_path / "hyp.txt"),
                 "--beam", "1", "--max-new-tokens", "3", "--lang", "ro"]) == 0
    assert len((tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()) == 2
    capsys.readouterr()
    assert main(["translate", str(checkpoints["m2m100"]), "--input", str(source), "--output", str(tmp_path / "h2.txt")]) == 2
    assert "source language" in capsys.readouterr().err
