"""MetaSeq2SeqTrainer: the engine's meta-gradient inside a transformers Seq2SeqTrainer.

Tiny Marian models from a config, a SentencePiece tokenizer trained here on synthetic
"languages" (word-level ciphers of English), datasets built in memory.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import sacrebleu
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, GenerationConfig, MarianConfig, MarianMTModel, TrainerCallback

from metanmt import registry
from metanmt.config import AlgorithmConfig
from metanmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, save_tokenizer, train_vocab
from metanmt.engine.inner import InnerLoop, select_names
from metanmt.engine.sampler import TaskSampler, episode_torch_seed
from metanmt.errors import NonFiniteError
from metanmt.hf import DatasetError, MetaArgumentsError, MetaSeq2SeqTrainer, MetaSeq2SeqTrainingArguments
from metanmt.tasks.translation import TranslationFamily

@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The Trainer's Accelerator state is a process-wide singleton: a bf16 test must not leave it to the
    next test (the engine's trainer asks for mixed_precision='no')."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


WORDS = "the cat dog sees a red blue house big small runs jumps over under tree river bird green old new".split()
LANGS = {"de": lambda w: w[::-1], "fr": lambda w: w + "e", "es": lambda w: "el" + w[:3]}


def synthetic_pairs(lang: str, n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(3, 7)))]
        rows.append({"lang": lang, "src": " ".join(LANGS[lang](w) for w in words), "en": " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t for lang in LANGS for row in synthetic_pairs(lang, 60, 0) for t in (row["src"], row["en"])]
    tokenizer = train_vocab(texts, vocab_size=320)
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tokenizer, directory)
    tokenizer.saved_to = directory
    return tokenizer


def tokenized(tok, rows: list[dict[str, str]]) -> Dataset:
    def encode(batch):
        return tok(batch["src"], text_target=batch["en"], max_length=32, truncation=True)

    return Dataset.from_list(rows).map(encode, batched=True)


@pytest.fixture(scope="module")
def train_ds(tok):
    rows = [row for i, lang in enumerate(LANGS) for row in synthetic_pairs(lang, 40, 10 + i)]
    return tokenized(tok, rows)


@pytest.fixture(scope="module")
def eval_ds(tok):
    return tokenized(tok, synthetic_pairs("de", 8, 99))


def tiny_model(tok, seed: int = 0, dropout: float = 0.1) -> MarianMTModel:
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=len(tok), decoder_vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        dropout=dropout, max_position_embeddings=64, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID, forced_eos_token_id=None, tie_word_embeddings=True,
        share_encoder_decoder_embeddings=True, attn_implementation="eager",
    )
    model = MarianMTModel(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID, max_length=12, num_beams=1)
    return model


def meta_args(tmp_path, **overrides) -> MetaSeq2SeqTrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, meta_batch_size=3, inner_steps=2, inner_lr=0.1,
                  support_tokens=40, query_tokens=40, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                  use_cpu=True, disable_tqdm=True)
    values.update(overrides)
    return MetaSeq2SeqTrainingArguments(**values)


class GradCapture(TrainerCallback):
    """The gradients the optimizer is about to apply, at the first step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


ADAPT = {"maml": ["model.shared.*", "model.encoder.*"]}


@pytest.mark.parametrize("algo, clip", [("maml", None), ("fomaml", None), ("reptile", None), ("multitask", None),
                                        ("maml", 0.05)])
def test_first_meta_gradient_equals_the_engines(tmp_path, tok, train_ds, algo, clip):
    model = tiny_model(tok)
    reference = copy.deepcopy(model)
    inner_optimizer = "adam" if algo == "reptile" else "sgd"
    adapt = ADAPT.get(algo, ["*"])
    args = meta_args(tmp_path, meta_algorithm=algo, inner_optimizer=inner_optimizer, adapt=adapt, max_grad_norm=0.0,
                     support_in_outer=algo == "fomaml", inner_grad_clip=clip)
    capture = GradCapture()
    trainer = MetaSeq2SeqTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model), callbacks=[capture])
    trainer.train()

    # the engine: its translation family's loss, its inner loop and algorithm, on the same episodes and weights
    family = TranslationFamily({"train_languages": list(LANGS)}, {})
    family.use_tokenizer(tok.saved_to)
    cfg = AlgorithmConfig(name=algo, inner_steps=2, inner_lr=0.1, inner_optimizer=inner_optimizer, adapt=adapt,
                          support_in_outer=algo == "fomaml")
    algorithm = registry.algorithm(algo)(cfg)
    names = select_names(reference, adapt) if algorithm.uses_inner_loop else []
    inner = InnerLoop(family, reference, names, 2, 0.1, inner_optimizer, grad_clip=clip)
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    reference.train()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    episodes = list(TaskSampler(trainer.tasks, seed=0, meta_batch_size=3).local_episodes(0))
    assert len({e.task for _, e in episodes}) > 1 or len(episodes) == 3
    for index, episode in episodes:
        torch.manual_seed(episode_torch_seed(0, 0, index))
        result = algorithm.task_gradient(inner, params, episode, {})
        losses.append(float(result.loss))
        for n, g in result.grads.items():
            expected[n] += g / len(episodes)

    assert set(capture.grads) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(capture.grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert sum(float(g.abs().sum()) for g in expected.values()) > 0
    if clip is not None:  # the bound was active: without it the engine's meta-gradient differs
        unclipped = InnerLoop(family, reference, names, 2, 0.1, inner_optimizer)
        torch.manual_seed(episode_torch_seed(0, 0, episodes[0][0]))
        free = algorithm.task_gradient(unclipped, params, episodes[0][1], {})
        torch.manual_seed(episode_torch_seed(0, 0, episodes[0][0]))
        bounded = algorithm.task_gradient(inner, params, episodes[0][1], {})
        assert any(not torch.allclose(free.grads[n], bounded.grads[n]) for n in free.grads)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged[0]["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_ends_with_the_same_weights(tmp_path, tok, train_ds):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, meta_algorithm="fomaml", inner_steps=1,
                  learning_rate=3e-3, warmup_steps=1, lr_scheduler_type="linear", max_grad_norm=1.0)

    def run(directory, callbacks=(), resume=None):
        model = tiny_model(tok, seed=0)
        trainer = MetaSeq2SeqTrainer(model=model, args=meta_args(tmp_path, output_dir=str(directory), **common),
                                     train_dataset=train_ds, processing_class=tok, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "crash", callbacks=[StopAt(2)])
    assert (tmp_path / "crash" / "checkpoint-2").is_dir() and not (tmp_path / "crash" / "checkpoint-4").exists()
    resumed = run(tmp_path / "crash", resume=str(tmp_path / "crash" / "checkpoint-2"))

    assert resumed.state.global_step == straight.state.global_step == 4
    start = tiny_model(tok, seed=0).state_dict()
    final_a, final_b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(start[k], final_a[k]) for k in final_a)
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    loss_a = [r["loss"] for r in straight.state.log_history if "loss" in r]
    loss_b = [r["loss"] for r in resumed.state.log_history if "loss" in r]
    assert loss_a == loss_b


def test_evaluation_with_generation_returns_sacrebleu(tmp_path, tok, train_ds, eval_ds):
    def compute_metrics(prediction):
        preds = np.where(prediction.predictions != -100, prediction.predictions, tok.pad_token_id)
        labels = np.where(prediction.label_ids != -100, prediction.label_ids, tok.pad_token_id)
        hyps = tok.batch_decode(preds, skip_special_tokens=True)
        refs = tok.batch_decode(labels, skip_special_tokens=True)
        return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}

    model = tiny_model(tok, dropout=0.0)
    args = meta_args(tmp_path, max_steps=2, learning_rate=1e-2, predict_with_generate=True, generation_max_length=12,
                     eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = MetaSeq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tok, compute_metrics=compute_metrics)
    trainer.train()
    assert any("eval_bleu" in r for r in trainer.state.log_history)  # evaluation during training
    metrics = trainer.evaluate()
    assert {"eval_bleu", "eval_chrf", "eval_loss"} <= set(metrics)

    # the same number from a plain generate + sacreBLEU on the same model
    model.eval()
    hyps = []
    with torch.no_grad():
        for i in range(0, len(eval_ds), 4):
            rows = eval_ds[i: i + 4]
            batch = tok.pad({"input_ids": rows["input_ids"]}, return_tensors="pt")
            out = model.generate(**batch, max_length=12)
            hyps += tok.batch_decode(out, skip_special_tokens=True)
    refs = tok.batch_decode(list(eval_ds["labels"]), skip_special_tokens=True)
    assert metrics["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_dataset_without_the_task_column_is_one_clear_error(tmp_path, tok, train_ds):
    model = tiny_model(tok)
    with pytest.raises(DatasetError, match=r"no column 'language' \(task_column\).*columns are lang, src, en, input_ids"):
        MetaSeq2SeqTrainer(model=model, args=meta_args(tmp_path, task_column="language"), train_dataset=train_ds,
                           processing_class=tok)
    assert issubclass(DatasetError, ValueError)


def test_a_task_too_small_for_an_episode_is_one_clear_error(tmp_path, tok, train_ds):
    model = tiny_model(tok)
    small = tokenized(tok, synthetic_pairs("de", 40, 1) + synthetic_pairs("fr", 4, 2))
    args = meta_args(tmp_path, support_examples=3, query_examples=2)
    with pytest.raises(DatasetError, match=r"1 task\(s\) too small .* support_examples \+ query_examples = 5 examples: 'fr' \(4 examples\)"):
        MetaSeq2SeqTrainer(model=model, args=args, train_dataset=small, processing_class=tok)
    tokens = sum(len(x) for x in small.filter(lambda r: r["lang"] == "fr")["labels"])
    with pytest.raises(DatasetError, match=rf"'fr' \(4 examples, {tokens} target tokens\)"):
        MetaSeq2SeqTrainer(model=model, args=meta_args(tmp_path, support_tokens=40, query_tokens=40), train_dataset=small,
                           processing_class=tok)


@pytest.mark.parametrize("overrides, message", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2: not supported.*raise meta_batch_size"),
    ({"max_steps": -1}, "max_steps: set a positive number of meta-steps"),
    ({"fp16": True}, "fp16: not supported.*use bf16"),
    ({"meta_algorithm": "nope"}, "meta_algorithm: unknown algorithm 'nope'"),
    ({"adapt": ["decoder.*"]}, "adapt: patterns \\['decoder.\\*'\\] match no trainable parameter"),
    ({"inner_grad_clip": 0.0}, "inner_grad_clip: must be positive"),
])
def test_unsupported_settings_fail_at_construction(tmp_path, tok, train_ds, overrides, message):
    with pytest.raises(MetaArgumentsError, match=message):
        MetaSeq2SeqTrainer(model=tiny_model(tok), args=meta_args(tmp_path, **overrides), train_dataset=train_ds,
                           processing_class=tok)


def test_a_non_finite_meta_gradient_stops_before_the_update(tmp_path, tok, train_ds):
    model = tiny_model(tok)
    with torch.no_grad():
        model.model.shared.weight[5:] = float("nan")  # every real token embedding
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MetaSeq2SeqTrainer(model=model, args=meta_args(tmp_path), train_dataset=train_ds, processing_class=tok)
    with pytest.raises(NonFiniteError, match=r"meta-step 0: non-finite loss or meta-gradient on '(de|fr|es)' \(episode 0\)"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.equal(torch.nan_to_num(p), torch.nan_to_num(before[name])), name


def test_bf16_runs_the_inner_loop_under_autocast(tmp_path, tok, train_ds):
    trainer = MetaSeq2SeqTrainer(model=tiny_model(tok), args=meta_args(tmp_path, bf16=True, meta_algorithm="maml"),
                                 train_dataset=train_ds, processing_class=tok)
    seen = []
    loss = trainer.tasks.loss

    def spy(model, params, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss(model, params, batch)

    trainer.tasks.loss = spy
    trainer.train()
    assert seen and all(seen)
    assert np.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """DDP (2 gloo processes, meta-batch 3 split 2 + 1) gives the 1-process meta-gradients and weights."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distributed import free_port

    root = Path(__file__).resolve().parents[1]
    script = str(root / "tests" / "hf_distributed_run.py")
    algos = "maml,reptile"  # second order through the bypassed DDP wrapper; a contribution that is not a gradient
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    results = {}
    for processes in (1, 2):
        out = tmp_path / str(processes)
        out.mkdir()
        cmd = [sys.executable, script] if processes == 1 else [
            launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), script]
        proc = subprocess.run([*cmd, str(out), algos], env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[processes] = torch.load(out / "results.pt")
    for algo in algos.split(","):
        one, two = results[1][algo], results[2][algo]
        assert (one["world_size"], two["world_size"]) == (1, 2), "accelerate did not start two processes"
        for name, g in one["grads"].items():
            assert torch.allclose(g, two["grads"][name], atol=1e-6, rtol=1e-4), (algo, name)
        for name, p in one["params"].items():
            assert torch.allclose(p, two["params"][name], atol=1e-6, rtol=1e-4), (algo, name)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
