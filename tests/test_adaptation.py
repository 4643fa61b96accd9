"""Adaptation: sacreBLEU scoring, budgeted fine-tuning (budget, frozen parameters, early stopping,
exact resume), translation and evaluation of a fine-tuned run, through the API and the CLI."""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch

from metanmt.adaptation.finetune import Finetuner, FinetuneRecipe, adapt_patterns, english_words, finetune_run, take_budget
from metanmt.adaptation.loading import open_translation_model
from metanmt.data.corpus import read_pairs
from metanmt.tasks.base import select_names
from metanmt.tasks.translation.batching import length_sorted_batches, micro_batches, plan_batches
from metanmt.tasks.translation.training import LoopPosition, TrainingLoop
from metanmt.cli import main
from metanmt.data.corpus import Pair
from metanmt.errors import DataError, UserError
from metanmt.evaluation.scoring import score, score_files

# -- a tiny synthetic l10n corpus and a tiny meta-trained run ---------------------------------------

WORDS = ("open save file close print user name date time page list edit delete folder new old main help view "
         "search settings account password email send receive message error warning select all none copy").split()


def _language(lang: str):
    """A word-by-word cipher of English: enough structure for a 1-layer model to learn something."""
    if lang == "aa":
        return lambda w: w[::-1]
    if lang == "bb":
        return lambda w: w.replace("a", "ä") + "o"
    if lang == "xa":
        return lambda w: w[::-1] + "i"
    return lambda w: w.replace("e", "ë")[::-1]  # xb


def make_pairs(lang: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{lang}-{seed}")
    cipher = _language(lang)
    out = []
    for _ in range(n):
        en = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append((" ".join(cipher(w) for w in en), " ".join(en).capitalize()))
    return out


def write_tsv(path: Path, lang: str, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "lang\tsrc\ten\torigin\n" + "".join(f"{lang}\t{s}\t{e}\ttest\n" for s, e in pairs)
    path.write_bytes(gzip.compress(text.encode("utf-8")))


def make_l10n(root: Path) -> Path:
    """meta_train/{aa,bb}, dev/xa, test/{xa,xb}, finetune/{xa,xb}.{100,300}, split.json (xb.300 incomplete,
    so the pool is its 200-word file)."""
    for lang in ("aa", "bb"):
        write_tsv(root / "meta_train" / f"{lang}.tsv.gz", lang, make_pairs(lang, 300, 0))
    for lang in ("xa", "xb"):
        write_tsv(root / "test" / f"{lang}.tsv.gz", lang, make_pairs(lang, 12, 1))
        pool = make_pairs(lang, 120, 2)
        for budget in (100, 300):
            chosen, _ = take_budget([Pair(*p) for p in pool[:50] if lang == "xb"] or [Pair(*p) for p in pool], budget)
            write_tsv(root / "finetune" / f"{lang}.{budget}.tsv.gz", lang, [tuple(p) for p in chosen])
    write_tsv(root / "dev" / "xa.tsv.gz", "xa", make_pairs("xa", 10, 3))
    split = {"finetune": {"xb": {"100": {"complete": True}, "300": {"complete": False, "en_words": 200}}}}
    (root / "split.json").write_text(json.dumps(split))
    return root


TINY_RUN = [
    "family=translation", "task.source=files", "task.train_languages=[aa, bb]", "task.test_languages=[xa, xb]",
    "task.vocab_size=320", "task.vocab_cache=false", "task.support_tokens=120", "task.query_tokens=120",
    "task.max_source_length=24", "task.max_target_length=24", "task.max_new_tokens=12",
    "model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1", "model.attention_heads=2",
    "model.ffn_dim=64", "model.dropout=0.1", "model.max_positions=64",
    "algorithm.name=multitask", "optim.name=adam", "optim.lr=0.003", "train.steps=2", "train.save_every=2",
    "train.meta_batch_size=2", "train.trackers=[]", "train.eval_every=0",
]


def make_run(root: Path, out: Path, *extra: str) -> Path:
    """Meta-train (multi-task, 2 steps) a tiny Marian model on the synthetic corpus."""
    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    torch.manual_seed(0)
    MetaTrainer(load_config(None, [*TINY_RUN, f"data.root={root}", *extra]), out).train()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_l10n(tmp_path_factory.mktemp("l10n"))


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(corpus, tmp_path_factory.mktemp("runs") / "multi")


def recipe(**kw: Any) -> FinetuneRecipe:
    base = dict(lr=3e-3, max_tokens=60, epochs=2, max_steps=12, eval_every=3, patience=0, dev_segments=6,
                max_new_tokens=10)
    return FinetuneRecipe(**{**base, **kw})


class Killed(Exception):
    """What :func:`stop_after` raises from a fine-tune's ``after_update`` hook."""


def stop_after(tuner: Finetuner, update: int) -> None:
    """Run ``tuner`` and stop it right after ``update``, as a kill would: its checkpoints stay."""

    def kill(step: int) -> None:
        if step == update:
            raise Killed

    tuner.after_update = kill
    with pytest.raises(Killed):
        tuner.run()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- scoring --------------------------------------------------------------------------------------

HYPS = ["The cat sat on the mat.", "", "Ünïcödé façade — naïve café ☕", "a b c d e", "Ein Haus."]
REFS = ["The cat sat on a mat.", "Nothing here.", "Unicode façade — naïve café ☕", "a b c d e", "A house."]


def test_score_agrees_with_sacrebleu_including_empty_and_unicode(tmp_path: Path) -> None:
    result = score(HYPS, REFS, per_segment=True)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert "chrF2" in result["chrf_signature"] or "nc:6" in result["chrf_signature"]
    assert result["segments"][1] == {"bleu": 0.0, "chrf": pytest.approx(sacrebleu.sentence_chrf("", ["Nothing here."]).score)}
    assert result["segments"][3]["bleu"] == pytest.approx(100.0)
    assert result["segments"][2]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(HYPS[2], [REFS[2]]).score)
    assert score([""], ["x"])["bleu"] == 0.0  # an all-empty system is scored, not an error

    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")  # the empty line is a hypothesis
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    assert score_files(hyp, ref)["bleu"] == result["bleu"]
    ref.write_text("\n".join(REFS[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{hyp}.*5 lines.*{ref}.*4"):
        score_files(hyp, ref)
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref)]) == 2  # one line, no traceback
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref), "--per-segment", "--json"]) == 0


# -- budgets ----------------------------------------------------------------------------------------


def test_budget_takes_a_reproducible_prefix_or_sample_and_warns_past_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    pairs = [Pair(f"s{i}", " ".join(["w"] * (1 + i % 4))) for i in range(50)]
    chosen, info = take_budget(pairs, 20)
    assert chosen == pairs[: len(chosen)] and english_words(chosen) >= 20 and english_words(chosen[:-1]) < 20
    assert info["complete"] and info["pairs"] == len(chosen)
    a, _ = take_budget(pairs, 20, order="sample", seed=3)
    assert a == take_budget(pairs, 20, order="sample", seed=3)[0] and a != chosen
    everything, info = take_budget(pairs, 10**6)
    assert everything == pairs and not info["complete"] and "larger than the pool" in caplog.text
    lengths = [3, 5, 2, 7, 1, 4]
    batches = plan_batches(lengths, 8, None)
    assert [i for b in batches for i in b] == list(range(6)) and all(sum(lengths[i] for i in b) <= 8 for b in batches)


def test_micro_batches_and_length_sorted_batches_cover_every_row_once_sorted_by_source_length() -> None:
    rows = [([1] * s, [2] * t) for s, t in [(9, 3), (2, 4), (5, 2), (2, 1), (7, 5), (4, 3)]]  # 18 target tokens
    parts = micro_batches(rows, 7)
    assert len(parts) > 1 and all(sum(len(t) for _, t in p) <= 7 for p in parts)
    flat = [r for p in parts for r in p]
    assert sorted(map(str, flat)) == sorted(map(str, rows))  # each row once
    assert [len(s) for s, _ in flat] == sorted(len(s) for s, _ in rows)  # by source length
    assert micro_batches(rows, None) == [rows] == micro_batches(rows, 18)  # fits: the batch as it came
    assert micro_batches(rows, 1) == [[r] for r in sorted(rows, key=lambda r: (len(r[0]), len(r[1])))]  # a row each
    batches = length_sorted_batches(rows, 6)
    assert sorted(i for b in batches for i in b) == list(range(6)) and all(sum(len(rows[i][1]) for i in b) <= 6 for b in batches)
    assert [len(rows[i][0]) for b in batches for i in b] == [2, 2, 4, 5, 7, 9]


def test_micro_batched_updates_equal_whole_batch_updates(run_dir: Path, corpus: Path) -> None:
    """The parts' summed token losses are the batch's token mean: same loss, same Adam updates
    (dropout off, so that only the batching differs)."""
    loaded = open_translation_model(run_dir)
    pairs = read_pairs(corpus / "finetune" / "xa.300.tsv.gz")
    results = {}
    for micro in (None, 25):
        model = copy.deepcopy(loaded.model).eval()
        loop = TrainingLoop(loaded.family, model, pairs, select_names(model, ["*"]), 3e-3, 120, seed=1, grad_clip=1.0,
                            micro_tokens=micro)
        at = LoopPosition()
        losses = [float(loop.update(at)[0]) for _ in range(4)]
        results[micro] = losses, state(model)
    at = LoopPosition()
    assert min(len(micro_batches(loop.next_rows(at), 25)) for _ in range(4)) >= 3  # the batches really were split
    assert results[25][0] == pytest.approx(results[None][0], rel=1e-5)
    assert all(torch.allclose(results[25][1][n], results[None][1][n], atol=1e-5) for n in results[None][1])
    assert TrainingLoop(loaded.family, model, pairs, ["model.shared.weight"], 1e-3, 60).micro_tokens == 250  # CPU: on


def test_sentence_losses_equal_scoring_each_sentence_alone(run_dir: Path, corpus: Path) -> None:
    loaded = open_translation_model(run_dir)
    pairs = read_pairs(corpus / "test" / "xa.tsv.gz")[:12]
    nats, tokens = loaded.family.sentence_losses(loaded.model, pairs, max_tokens=25)  # several sorted batches
    alone = [loaded.family.sentence_losses(loaded.model, [p])[0][0] for p in pairs]  # no padding at all
    assert nats == pytest.approx(alone, rel=1e-5) and tokens == [len(t) for _, t in loaded.family.encode(pairs)]
    assert loaded.family.corpus_loss(loaded.model, pairs) == pytest.approx(sum(nats) / sum(tokens), rel=1e-6)


# -- fine-tuning ------------------------------------------------------------------------------------


def test_finetune_respects_budget_and_frozen_parameters(run_dir: Path, corpus: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = open_translation_model(run_dir)
    before = state(loaded.model)
    train = corpus / "finetune" / "xa.300.tsv.gz"
    budget_pairs, _ = take_budget(read_pairs(train), 100)
    allowed = {(tuple(s), tuple(t)) for s, t in loaded.family.encode(budget_pairs)}
    seen: set = set()
    collate = loaded.family.collate

    def spy(rows: list) -> dict:
        seen.update((tuple(s), tuple(t)) for s, t in rows)
        return collate(rows)

    monkeypatch.setattr(loaded.family, "collate", spy)
    result = finetune_run(loaded, train, tmp_path / "ft", recipe(adapt="emb+enc"), budget_words=100)
    assert result["pairs"] == len(budget_pairs) == result["budget"]["pairs"] and result["words"] >= 100
    assert seen and seen <= allowed  # not one pair from beyond the budget
    assert result["updates"] == min(12, 2 * result["batches_per_epoch"]) and result["pairs_seen"] > 0
    after = state(open_translation_model(tmp_path / "ft").model)
    adapted = [n for n in before if n.startswith(("model.shared.", "model.encoder."))]
    frozen = [n for n in before if n not in adapted]
    assert adapted and any(n.startswith("model.decoder.layers") for n in frozen)
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical
    assert any(not torch.equal(before[n], after[n]) for n in adapted)
    assert adapt_patterns("model.decoder.*, lm_head.*") == ["model.decoder.*", "lm_head.*"]
    # loaded checkpoints keep the sinusoidal tables frozen (docs/design.md, "Frozen positions"): never adapted
    assert not [n for n in select_names(open_translation_model(run_dir).model, ["*"]) if "embed_positions" in n]
    with pytest.raises(UserError, match="match no trainable parameter"):
        finetune_run(loaded, train, tmp_path / "ft2", recipe(adapt="nothing.*"))


def test_early_stopping_keeps_the_best_and_the_output_is_a_run(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "ft"
    # a high learning rate makes later checkpoints worse: the best is an early one, and it is what is kept
    result = finetune_run(run_dir, corpus / "finetune" / "xa.300.tsv.gz", out,
                          recipe(lr=0.06, dev_metric="loss", eval_every=2, patience=2, max_steps=40, epochs=20),
                          dev=corpus / "dev" / "xa.tsv.gz")
    losses = {int(d["step"]): d["loss"] for d in result["dev"]}
    assert result["best_step"] == min(losses, key=losses.get) and 0 in losses
    assert 0 < result["best_step"] < result["updates"], losses  # neither the init nor simply the last
    assert result["stopped"].startswith("early stop") and result["updates"] < 40
    loaded = open_translation_model(out)
    assert loaded.family.corpus_loss(loaded.model, read_pairs(corpus / "dev" / "xa.tsv.gz")[:6], 120) == pytest.approx(
        losses[result["best_step"]], abs=1e-5)
    assert not (out / "checkpoints").exists()  # the resume state is dropped once the result is recorded
    AutoModelForSeq2SeqLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    # a second call without --resume refuses; with --resume it returns the recorded result
    with pytest.raises(UserError, match="already holds a fine-tune"):
        finetune_run(run_dir, corpus / "finetune" / "xa.300.tsv.gz", out, recipe())
    again = finetune_run(run_dir, corpus / "finetune" / "xa.300.tsv.gz", out,
                         recipe(lr=0.06, dev_metric="loss", eval_every=2, patience=2, max_steps=40, epochs=20),
                         dev=corpus / "dev" / "xa.tsv.gz", resume=True)
    assert again["best_step"] == result["best_step"]

    # translate / evaluate accept the fine-tuned run
    src = tmp_path / "src.txt"
    src.write_text("nepo elif\n\nevas\n", encoding="utf-8")
    assert main(["translate", str(out), "--input", str(src), "--output", str(tmp_path / "hyp.txt"), "--beam", "2"]) == 0
    hyps = (tmp_path / "hyp.txt").read_text(encoding="utf-8").split("\n")
    assert len(hyps) == 4 and hyps[1] == "" and hyps[3] == ""  # one line per input line, empty stays empty
    assert main(["evaluate", str(out), "--test", str(corpus / "test" / "xa.tsv.gz"), "--beam", "2", "--json"]) == 0
    assert main(["evaluate", str(out)]) == 2  # --test is required for translation runs


def test_resume_after_a_kill_gives_bitwise_the_same_weights(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    train = read_pairs(corpus / "finetune" / "xa.300.tsv.gz")
    dev = read_pairs(corpus / "dev" / "xa.tsv.gz")
    r = recipe(max_steps=9, eval_every=3, dev_metric="loss")  # dropout 0.1: the RNG must be restored too

    def tuner(out: Path) -> Finetuner:
        loaded = open_translation_model(run_dir)
        return Finetuner(loaded.family, loaded.model, train, r, out, dev, loaded.run_config)

    whole = tuner(tmp_path / "whole")
    expected = whole.run()
    assert expected["best_step"] == expected["updates"] == 9  # so the weights compared below are the last ones

    stop_after(tuner(tmp_path / "killed"), 5)  # after the checkpoint at update 3, mid-way to the next
    assert (tmp_path / "killed" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(UserError, match="already holds a fine-tune"):
        tuner(tmp_path / "killed").run()
    resumed = tuner(tmp_path / "killed")
    got = resumed.run(resume=True)
    assert got["dev"] == expected["dev"] and got["best_step"] == expected["best_step"]
    assert got["pairs_seen"] == expected["pairs_seen"] and got["updates"] == expected["updates"]
    a, b = state(whole.model), state(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_sigkill_during_finetune_then_resume_gives_the_same_model(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def finetune(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "metanmt", "finetune", str(run_dir), "--train", str(corpus / "finetune" / "xa.300.tsv.gz"),
               "--dev", str(corpus / "dev" / "xa.tsv.gz"), "--output-dir", str(out), "--lr", "3e-3", "--max-tokens", "60",
               "--epochs", "30", "--max-steps", "80", "--eval-every", "4", "--patience", "0", "--dev-metric", "loss",
               "--dev-segments", "6", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "METANMT_PROGRESS": "0"}
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole = finetune(tmp_path / "whole")
    victim = finetune(tmp_path / "victim")
    checkpoint = tmp_path / "victim" / "checkpoints" / "last.pt"
    seen: set[float] = set()
    deadline = time.time() + 600  # generous: on a loaded machine the first checkpoints come late
    while time.time() < deadline and len(seen) < 3 and victim.poll() is None:  # a few checkpoints in
        if checkpoint.is_file():
            seen.add(checkpoint.stat().st_mtime)
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]
    assert checkpoint.is_file(), "the fine-tune finished before the kill; the test proves nothing"
    resumed = finetune(tmp_path / "victim", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "victim" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = json.loads((tmp_path / "victim" / "finetune.json").read_text())
    expected = json.loads((tmp_path / "whole" / "finetune.json").read_text())
    assert got["result"]["best_step"] == expected["result"]["best_step"]


def test_a_truncated_finetune_resume_file_falls_back_to_the_previous_one(run_dir: Path, corpus: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    train = read_pairs(corpus / "finetune" / "xa.300.tsv.gz")
    dev = read_pairs(corpus / "dev" / "xa.tsv.gz")
    r = recipe(max_steps=9, eval_every=3, dev_metric="loss")

    def tuner(out: Path) -> Finetuner:
        loaded = open_translation_model(run_dir)
        return Finetuner(loaded.family, loaded.model, train, r, out, dev, loaded.run_config)

    whole = tuner(tmp_path / "whole")
    expected = whole.run()

    stop_after(tuner(tmp_path / "killed"), 7)  # checkpoints at updates 3 (previous.pt) and 6 (last.pt) exist
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    assert (last.parent / "previous.pt").is_file()
    last.write_bytes(last.read_bytes()[:1000])  # a copy or a disk that stopped half-way
    resumed = tuner(tmp_path / "killed")
    got = resumed.run(resume=True)
    assert "skipping the damaged fine-tune checkpoint" in caplog.text and "last.pt" in caplog.text
    assert got["dev"] == expected["dev"] and got["updates"] == expected["updates"]
    a, b = state(whole.model), state(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_show_examples_prints_zero_shot_and_fine_tuned_translations(corpus: Path, tmp_path: Path) -> None:
    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    cfg = load_config(None, [*TINY_RUN, f"data.root={corpus}", "task.dev_languages=[xa]", "task.dev_budget='300'",
                             "task.dev_finetune_steps=2", "train.show_examples=2"])
    summary = MetaTrainer(cfg, tmp_path / "run").train()
    rows = summary["examples"]
    dev = read_pairs(corpus / "dev" / "xa.tsv.gz")
    assert [row["source"] for row in rows] == [p.src for p in dev[:2]]
    assert [row["reference"] for row in rows] == [p.en for p in dev[:2]]
    assert all(isinstance(row["zero-shot"], str) and isinstance(row["after 2 steps"], str) for row in rows)


def test_commands_take_a_device_and_bf16_and_load_with_fast_attention(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from metanmt.engine.checkpoint import read_history

    # the default attention (eager) stays what a run trained with; under auto, a multi-task run (no
    # double backward) is fine-tuned and decoded with sdpa
    assert open_translation_model(run_dir).model.config._attn_implementation == "eager"
    auto_run = make_run(corpus, tmp_path / "auto", "model.attn_implementation=auto")
    assert open_translation_model(auto_run).model.config._attn_implementation == "sdpa"
    assert all("peak_rss_mb" in r for r in read_history(run_dir, "train"))
    src = tmp_path / "src.txt"
    src.write_text("nepo elif\n\nevas\n", encoding="utf-8")
    assert main(["translate", str(run_dir), "--input", str(src), "--output", str(tmp_path / "hyp.txt"), "--beam", "2",
                 "--cpu", "--mixed-precision", "bf16"]) == 0
    assert len((tmp_path / "hyp.txt").read_text(encoding="utf-8").split("\n")) == 4
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit status 2, the allowed values named
        main(["translate", str(run_dir), "--input", str(src), "--output", str(tmp_path / "x.txt"), "--mixed-precision", "fp8"])
    assert exit_info.value.code == 2
