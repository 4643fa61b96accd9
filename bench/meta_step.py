"""Meta-step speed and memory: metanmt's engine against learn2learn and higher on the same computation.

    python bench/meta_step.py                       # every case below, each in its own process
    python bench/meta_step.py --case metanmt omniglot maml loop     # one case, prints one JSON row
    python bench/meta_step.py --profile translation fomaml loop     # where one meta-step's time goes

Settings (installing the peers: bench/README.md, "Meta-step speed and memory"):

- Omniglot: the MAML conv net (4 x conv3x3 64 + BN + ReLU + 2x2 max-pool, 28x28), 5-way 1-shot, 1
  query per class, meta-batch 32, one inner SGD step lr 0.4, outer Adam 1e-3.
- Translation: Marian from config, d_model 256, 3+3 layers, 4 heads, ffn 1024, vocab 8000, eager
  attention, dropout off; 16 support + 16 query pairs of length 20 per task, meta-batch 4, one
  inner SGD step lr 1e-3, outer Adam 1e-3.

Inputs are random (random images; random token ids from a stand-in 8000-piece vocabulary): the cost
of a step does not depend on the pixel or token values, and no dataset is needed. metanmt is timed
through its real ``MetaTrainer.meta_step`` (sampling, the algorithm, the all-reduce bookkeeping, the
outer Adam step); learn2learn (``MAML.clone/adapt``) and higher (``innerloop_ctx``) run the same
model, losses, episodes and outer Adam step, written as their documentation shows. "plain" is one
ordinary training step on all examples of the meta-batch at once (one batch of 320 images / 128
pairs), the unit for the overhead ratio.

Before timing, every implementation's meta-gradient at step 0 (same initial weights, same episodes)
is compared with metanmt's per-task loop: ``max_grad_diff`` is the largest absolute difference.
Then the median of ``--steps`` (default 20) steps after ``--warmup`` (3). Peak memory is the
process's own peak RSS (VmHWM; each case runs in a fresh process). The timed steps are steps that do
not log (``train.log_every`` is beyond the run), i.e. the training hot path. Every metanmt row gets
``meta_step_cost_in_plain_steps``: after its timed steps the case times ``--paired`` (default 10)
pairs of a meta-step and a plain step on the same examples, back to back in the same process, and
takes the median of the pairs' ratios (``paired_with_plain``: robust to the drift of a shared
machine's speed between cases); the ratio of the two cases' own medians is kept beside it
(``cost_in_plain_steps_unpaired``).

Then, unless ``--no-profile``, one profile per metanmt case (``PROFILE_CASES``, each in a fresh
process; see ``profile_case``): the ``profile`` entry of the results holds, per family/algorithm,
"after" (measured in this run) and "before" (the engine before its hot path was cut down, as recorded
in ``bench/results/meta_step_profile.json`` with how it was measured; that code path has no switch
here, so it is not re-measured). Profiles are shares of the step's time, not timings.
Writes ``bench/results/meta_step.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "meta_step.json"
# the recorded profiles of the meta-step: "before" = the engine before its hot path was cut down (no switch
# back to that code path is kept, so it cannot be re-measured here), "after" = this code; see profile_case
PROFILES = ROOT / "bench" / "results" / "meta_step_profile.json"
SEED = 0

# (impl, family, algo, variant): variant is metanmt's execution option (loop, vmap, +checkpoint) and,
# for every impl, "steps5" = five inner steps instead of one (where memory grows); "-" = the default
CASES = [
    ("metanmt", "omniglot", "maml", "loop"),
    ("metanmt", "omniglot", "maml", "vmap"),
    ("metanmt", "omniglot", "maml", "loop+checkpoint"),
    ("metanmt", "omniglot", "fomaml", "loop"),
    ("metanmt", "omniglot", "fomaml", "vmap"),
    ("metanmt", "omniglot", "reptile", "loop"),
    ("metanmt", "omniglot", "multitask", "loop"),
    ("plain", "omniglot", "plain", "-"),
    ("learn2learn", "omniglot", "maml", "-"),
    ("learn2learn", "omniglot", "fomaml", "-"),
    ("higher", "omniglot", "maml", "-"),
    ("higher", "omniglot", "fomaml", "-"),
    ("metanmt", "omniglot", "maml", "loop+steps5"),
    ("metanmt", "omniglot", "maml", "loop+steps5+checkpoint"),
    ("metanmt", "omniglot", "maml", "vmap+steps5"),
    ("metanmt", "omniglot", "maml", "vmap+steps5+checkpoint"),
    ("learn2learn", "omniglot", "maml", "steps5"),
    ("metanmt", "translation", "maml", "loop"),
    ("metanmt", "translation", "fomaml", "loop"),
    ("metanmt", "translation", "reptile", "loop"),
    ("metanmt", "translation", "multitask", "loop"),
    ("plain", "translation", "plain", "-"),
    ("learn2learn", "translation", "maml", "-"),
    ("learn2learn", "translation", "fomaml", "-"),
    ("higher", "translation", "maml", "-"),
    ("higher", "translation", "fomaml", "-"),
]
# the metanmt cases whose meta-step is profiled (shares of the time, not timings)
PROFILE_CASES = [(f, a, v) for i, f, a, v in CASES if i == "metanmt" and "steps5" not in v and "checkpoint" not in v]

SETTINGS = {
    "omniglot": {"meta_batch": 32, "inner_lr": 0.4, "ways": 5, "shots": 1, "query": 1},
    "translation": {"meta_batch": 4, "inner_lr": 1e-3, "pairs": 16, "length": 20, "vocab": 8000},
}


# -- the two task families, fed random inputs of the benchmark's shapes -----------------------------------
def synthetic_families() -> dict[str, type]:
    import numpy as np
    import torch

    from metanmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
    from metanmt.tasks.base import Episode
    from metanmt.tasks.omniglot import OmniglotFamily
    from metanmt.tasks.translation import TranslationFamily

    class RandomOmniglot(OmniglotFamily):
        name = "bench-omniglot"

        def prepare(self) -> None:
            pass

        def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
            t = self.task_cfg
            size = t.image_size

            def batch(per_class: int) -> dict[str, torch.Tensor]:
                images = torch.from_numpy(rng.random((t.ways * per_class, 1, size, size), dtype=np.float32))
                return {"images": images, "labels": torch.arange(t.ways).repeat(per_class)}

            return Episode("random", batch(t.shots), batch(t.query))

    class StandInTokenizer:
        """What the translation family asks of a tokenizer when it builds a model: size and special ids."""

        pad_token_id, unk_token_id, bos_token_id, eos_token_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

        def __len__(self) -> int:
            return SETTINGS["translation"]["vocab"]

    class RandomTranslation(TranslationFamily):
        name = "bench-translation"

        def prepare(self) -> None:
            pass

        @property
        def tokenizer(self) -> Any:
            return StandInTokenizer()

        def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
            s = SETTINGS["translation"]

            def batch() -> dict[str, torch.Tensor]:
                ids = lambda: [int(i) for i in rng.integers(4, s["vocab"], s["length"] - 1)] + [EOS_ID]  # noqa: E731
                return self.collate([(ids(), ids()) for _ in range(s["pairs"])])

            return Episode("random", batch(), batch())

    return {"omniglot": RandomOmniglot, "translation": RandomTranslation}


def inner_steps(variant: str) -> int:
    return 5 if "steps5" in variant else 1


def run_config(family: str, algo: str, variant: str) -> Any:
    from metanmt.config import load_config

    s = SETTINGS[family]
    base: dict[str, Any] = {
        "family": f"bench-{family}",
        "algorithm": {"name": algo, "inner_steps": inner_steps(variant), "inner_lr": s["inner_lr"],
                      "inner_optimizer": "sgd"},
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "grad_clip": None},
        "train": {"steps": 10**6, "meta_batch_size": s["meta_batch"], "seed": SEED, "trackers": [],
                  "log_every": 10**6, "save_every": 10**6,
                  "task_batching": "vmap" if "vmap" in variant else "loop",
                  "checkpoint_inner": "checkpoint" in variant},
    }
    if family == "omniglot":
        base["task"] = {"ways": s["ways"], "shots": s["shots"], "query": s["query"]}
        base["model"] = {"hidden": 64, "blocks": 4, "pooling": "max", "bn_policy": "batch"}
    else:
        base["task"] = {"source": "files", "train_languages": ["xx"]}
        base["model"] = {"d_model": 256, "encoder_layers": 3, "decoder_layers": 3, "attention_heads": 4, "ffn_dim": 1024,
                         "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                         "attn_implementation": "eager", "tie_embeddings": True}
    return load_config(None, [], base=base)


# -- one case: build, check the step-0 gradient, time -----------------------------------------------------
def direct_loss(family_name: str, family: Any, module: Any, batch: dict) -> Any:
    """The family's loss by calling ``module`` itself (what learn2learn clones and higher patches run)."""
    import torch.nn.functional as F

    if family_name == "omniglot":
        return F.cross_entropy(module(batch["images"]), batch["labels"])
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"], use_cache=False, return_dict=True).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def build_trainer(family_name: str, algo: str, variant: str) -> Any:
    """The benchmark's ``MetaTrainer`` (model, optimizer, sampler) for one case, in a scratch directory."""
    from metanmt import registry
    from metanmt.engine.trainer import MetaTrainer

    for name, cls in synthetic_families().items():
        registry.register("metanmt.task_families", f"bench-{name}", cls)
    return MetaTrainer(run_config(family_name, algo, variant), Path(tempfile.mkdtemp(prefix="meta_step_")) / "run")


def measure(impl: str, family_name: str, algo: str, variant: str, steps: int, warmup: int, grad_file: Path,
            paired: int = 0) -> dict:
    import torch

    from metanmt.engine.sampler import TaskSampler
    from metanmt.engine.trainer import peak_rss_mb

    trainer = build_trainer(family_name, algo if impl == "metanmt" else "maml", variant)  # what every impl uses
    cfg = trainer.cfg
    model, family, optimizer = trainer.model, trainer.family, trainer.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.algorithm.inner_lr
    first_order = algo == "fomaml"

    def episodes(step: int) -> list:
        return [e for _, e in TaskSampler(family, SEED, cfg.train.meta_batch_size).local_episodes(step)]

    def plain_step(step: int) -> None:
        eps = episodes(step)
        batch = functools.reduce(family.merge_batches, [b for e in eps for b in (e.support, e.query)])
        loss = direct_loss(family_name, family, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_fn: Callable[[int], None]
    if impl == "metanmt":
        step_fn = trainer.meta_step
    elif impl == "plain":
        step_fn = plain_step
    elif impl == "learn2learn":
        l2l = importlib.import_module("learn2learn")

        maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order, allow_nograd=True)

        def step_fn(step: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            eps = episodes(step)
            for e in eps:
                learner = maml.clone()
                for _ in range(inner_steps(variant)):
                    learner.adapt(direct_loss(family_name, family, learner, e.support))
                (direct_loss(family_name, family, learner, e.query) / len(eps)).backward()
            optimizer.step()
    elif impl == "higher":
        higher = importlib.import_module("higher")
        inner_opt = torch.optim.SGD(params, lr=lr)

        def step_fn(step: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            eps = episodes(step)
            for e in eps:
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                          track_higher_grads=not first_order) as (fmodel, diffopt):
                    for _ in range(inner_steps(variant)):
                        diffopt.step(direct_loss(family_name, family, fmodel, e.support))
                    query_loss = direct_loss(family_name, family, fmodel, e.query) / len(eps)
                    if not first_order:
                        query_loss.backward()
                        continue
                    # without tracking, the fast weights are cut from the model: the first-order
                    # meta-gradient is the query gradient at the fast weights, added by hand
                    fast = [w for w in fmodel.parameters() if w.requires_grad]
                    for p, g in zip(params, torch.autograd.grad(query_loss, fast)):
                        p.grad = g if p.grad is None else p.grad + g
            optimizer.step()
    else:
        raise SystemExit(f"unknown impl {impl}")

    # step 0's meta-gradient, taken just before the outer update
    captured: dict[str, Any] = {}
    original_step = optimizer.step

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.setdefault("grad", torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                               for p in params]).detach().clone())
        return original_step(*args, **kwargs)

    optimizer.step = capture  # type: ignore[method-assign]
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\(\)` has been overridden")
    step_fn(0)
    optimizer.step = original_step  # type: ignore[method-assign]
    torch.save(captured["grad"], grad_file)
    for step in range(1, warmup):
        step_fn(step)
    times = []
    for step in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step_fn(step)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    row = {"impl": impl, "family": family_name, "algo": algo, "variant": variant, "steps_per_s": 1.0 / median,
           "ms_per_step": 1000.0 * median, "peak_mb": peak_rss_mb(),  # read before any plain step below
           "timed_steps": steps, "threads": torch.get_num_threads()}
    if impl == "metanmt" and paired:
        row.update(paired_with_plain(step_fn, plain_step, warmup + steps, paired))
    return row


def paired_with_plain(meta_step: Callable[[int], None], plain_step: Callable[[int], None], first: int,
                      pairs: int) -> dict:
    """The meta-step's cost in plain steps, measured in pairs: a meta-step, then a plain step on the
    same examples, in the same process, ``pairs`` times; the median of the pairs' ratios.

    On a shared machine the speed of a core drifts by tens of percent within minutes, so a ratio of
    two medians taken minutes apart (two cases, two processes) carries that drift; two steps timed
    back to back share the machine's state. They also share the memory allocator's state: where the
    meta-step grows the heap far beyond the plain step's (vmap over many tasks), the plain step runs
    faster than in its own process and the ratio reads high (bench/README.md, "Meta-step speed").
    The plain steps run after the meta-step's peak memory was read, on the same model and optimizer
    (the values of the weights do not change the cost)."""
    plain_step(first)  # its own warm-up: a batch of the merged shape has not run in this process yet
    ratios, meta_times, plain_times = [], [], []
    for step in range(first + 1, first + 1 + pairs):
        t0 = time.perf_counter()
        meta_step(step)
        t1 = time.perf_counter()
        plain_step(step)
        t2 = time.perf_counter()
        meta_times.append(t1 - t0)
        plain_times.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {"paired_steps": pairs, "paired_meta_ms": 1000.0 * statistics.median(meta_times),
            "paired_plain_ms": 1000.0 * statistics.median(plain_times),
            "cost_in_plain_steps_paired": statistics.median(ratios),
            "cost_in_plain_steps_paired_range": [min(ratios), max(ratios)]}


# top-level ops of the engine's bookkeeping rather than the model's arithmetic (zero-filled dicts,
# the flatten-and-copy, finiteness checks, accumulation, host reads); listed with their inclusive share
BOOKKEEPING_OPS = ("aten::zeros_like", "aten::zero_", "aten::cat", "aten::isfinite", "aten::all", "aten::add_",
                   "aten::_foreach_add_", "aten::div", "aten::div_", "aten::item", "aten::sum")


def profile_case(family_name: str, algo: str, variant: str, steps: int, warmup: int) -> dict:
    """Where one ``MetaTrainer.meta_step`` (a step that does not log) spends its time, over ``steps``
    meta-steps after ``warmup``: torch.profiler's self CPU time per op (top five), the inclusive time
    of the bookkeeping ops, and cProfile's self time per Python function (top five) and cumulative
    time of the engine's own functions.

    Shares of the total, not timings: they stay meaningful on a busy machine, where wall-clock
    time does not. Profiling adds a fixed overhead to every call, which inflates small ops."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer(family_name, algo, variant)
    for step in range(warmup):
        trainer.meta_step(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(warmup, warmup + steps):
            trainer.meta_step(step)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 or e.cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for step in range(warmup + steps, warmup + 2 * steps):
        trainer.meta_step(step)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    step_key = next(k for k in stats if k[2] == "meta_step")
    py_total = stats[step_key][3]
    functions = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    engine = sorted(((k, v) for k, v in stats.items() if "/metanmt/engine/" in k[0] and k != step_key),
                    key=lambda kv: kv[1][3], reverse=True)

    def where(key: tuple) -> str:
        file, line, name = key
        return name if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line}({name})"

    by_op = {e.key: e for e in events}
    return {
        "family": family_name, "algo": algo, "variant": variant, "profiled_steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(),
        "top5_ops_self": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4),
                           "calls_per_step": e.count // steps} for e in ops[:5]],
        "bookkeeping_ops_inclusive": {name: {"share": round(by_op[name].cpu_time_total / total, 4),
                                             "calls_per_step": by_op[name].count // steps}
                                      for name in BOOKKEEPING_OPS if name in by_op},
        "top5_python_self": [{"function": where(k), "share": round(v[2] / py_total, 4), "calls_per_step": v[0] // steps}
                             for k, v in functions[:5]],
        "engine_functions_cumulative": [{"function": where(k), "share": round(v[3] / py_total, 4),
                                         "calls_per_step": v[0] // steps} for k, v in engine[:8]],
    }


def declare_torchvision_ops() -> None:
    """learn2learn imports torchvision, whose only wheel here is a CUDA build: its compiled ops do not
    load beside the CPU torch, and its import then fails registering fake kernels for two operators
    that do not exist (and takes transformers' Marian import down with it). Declaring the two
    schemas first lets it import; no torchvision operator is used (bench/README.md, "Meta-step speed and memory")."""
    import torch

    if importlib.util.find_spec("torchvision") is None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # the real extension loaded and declared it
    declare_torchvision_ops.library = lib  # type: ignore[attr-defined]  # keep the definitions alive


# -- the driver --------------------------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__}
    for name in ("learn2learn", "higher"):
        try:
            importlib.import_module(name)
            info[name] = importlib.metadata.version(name)
        except Exception as error:  # noqa: BLE001 -- recorded, that peer is then skipped
            info[name] = f"not importable: {type(error).__name__}: {error}"
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_profiles(cases: list[tuple[str, str, str]], threads: int, steps: int) -> list[dict]:
    """One profile per case, each in a fresh process: "after" measured now, "before" as recorded in PROFILES."""
    recorded = json.loads(PROFILES.read_text(encoding="utf-8")) if PROFILES.is_file() else {}
    before = {(e["family"], e["algo"], e["variant"]): e for e in recorded.get("before", {}).get("entries", [])}
    out = []
    for family, algo, variant in cases:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, __file__, "--profile", family, algo, variant, "--threads", str(threads),
                               "--profile-steps", str(steps)], capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PROFILE ")]
        after = json.loads(lines[-1][8:]) if proc.returncode == 0 and lines else {
            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        entry = {"family": family, "algo": algo, "variant": variant, "after": after}
        if (family, algo, variant) in before:
            entry["before"] = {**before[(family, algo, variant)], "measured": recorded["before"]["measured"]}
        out.append(entry)
        top = ", ".join(f"{o['op']} {o['share']:.1%}" for o in after.get("top5_ops_self", []))
        print(f"profile {family:>11} {algo:>9} {variant:>6}: {top or after.get('error')}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=4, metavar=("IMPL", "FAMILY", "ALGO", "VARIANT"))
    parser.add_argument("--profile", nargs=3, metavar=("FAMILY", "ALGO", "VARIANT"),
                        help="profile metanmt's meta-step on one case and print one JSON line (no timing)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-threads", type=int, default=1,
                        help="threads of the profiled runs (1: as the recorded 'before' profiles were taken)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles after the timed cases")
    parser.add_argument("--family", choices=["omniglot", "translation"], action="append")
    parser.add_argument("--algo", choices=["maml", "fomaml", "reptile", "multitask", "plain"], action="append")
    parser.add_argument("--impl", choices=["metanmt", "learn2learn", "higher", "plain"], action="append")
    parser.add_argument("--variant", action="append", help="only these variants (e.g. loop; the plain step's is -)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--paired", type=int, default=10,
                        help="metanmt cases: then time this many (meta-step, plain step) pairs in the same process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grad-file", type=Path)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    declare_torchvision_ops()  # before anything imports transformers or learn2learn
    if args.profile:  # a child process: one profile, one JSON line on stdout
        import torch

        torch.set_num_threads(args.threads)
        row = profile_case(*args.profile, steps=args.profile_steps, warmup=1)
        print("PROFILE " + json.dumps(row), flush=True)
        return 0
    if args.case:  # a child process: one case, one JSON line on stdout
        import torch

        torch.set_num_threads(args.threads)
        impl, family, algo, variant = args.case
        row = measure(impl, family, algo, variant, args.steps, args.warmup, args.grad_file, args.paired)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    info = versions()
    cases = [c for c in CASES if (not args.family or c[1] in args.family) and (not args.algo or c[2] in args.algo)
             and (not args.impl or c[0] in args.impl) and (not args.variant or c[3] in args.variant)]
    # every checked gradient needs metanmt's per-task loop on the same case, run first
    needed = [("metanmt", f, a, "loop+steps5" if inner_steps(v) == 5 else "loop") for _, f, a, v in cases if a != "plain"]
    cases = list(dict.fromkeys([c for c in CASES if c in needed] + cases))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference: dict[str, Any] = {}
        for impl, family, algo, variant in cases:
            if impl in ("learn2learn", "higher") and str(info[impl]).startswith("not importable"):
                rows.append({"impl": impl, "family": family, "algo": algo, "variant": variant, "skipped": info[impl]})
                print(f"{impl:>11} {family:>11} {algo:>9} {variant:>15}: skipped ({info[impl]})", flush=True)
                continue
            grad_file = Path(tmp) / f"{impl}-{family}-{algo}-{variant}.pt".replace("+", "_")
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, __file__, "--case", impl, family, algo, variant, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--grad-file", str(grad_file),
                                   "--paired", str(args.paired)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"impl": impl, "family": family, "algo": algo, "variant": variant, "error": error})
                print(f"{impl:>11} {family:>11} {algo:>9} {variant:>15}: FAILED {error}", flush=True)
                continue
            row = json.loads(lines[-1][4:])
            import torch

            grad = torch.load(grad_file)
            key = (family, algo, inner_steps(variant))
            if impl == "metanmt" and variant in ("loop", "loop+steps5"):
                reference[key] = grad
            ref = reference.get(key)
            row["max_grad_diff"] = float((grad - ref).abs().max()) if ref is not None and algo != "plain" else None
            row["max_abs_grad"] = float(grad.abs().max())
            rows.append(row)
            print(f"{impl:>11} {family:>11} {algo:>9} {variant:>15}: {row['steps_per_s']:6.3f} steps/s "
                  f"{row['ms_per_step']:8.1f} ms {row['peak_mb']:7.0f} MB  grad diff {row['max_grad_diff']}"
                  + (f"  {row['cost_in_plain_steps_paired']:.2f} plain steps (paired)" if "cost_in_plain_steps_paired" in row else ""),
                  flush=True)

    def find(impl: str, family: str, algo: str, variant: str = "-") -> dict | None:
        return next((r for r in rows if (r["impl"], r["family"], r["algo"], r["variant"]) == (impl, family, algo, variant)
                     and "steps_per_s" in r), None)

    for row in rows:  # every metanmt row, reptile and multitask included, in units of a plain step
        plain = find("plain", row["family"], "plain")
        if row["impl"] == "metanmt" and "steps_per_s" in row and plain:
            # the paired ratio where measured (see paired_with_plain); the ratio of the two cases' medians beside it
            row["cost_in_plain_steps_unpaired"] = plain["steps_per_s"] / row["steps_per_s"]
            row["meta_step_cost_in_plain_steps"] = row.get("cost_in_plain_steps_paired", row["cost_in_plain_steps_unpaired"])

    ratios = []
    for family in ("omniglot", "translation"):
        plain = find("plain", family, "plain")
        for algo in ("maml", "fomaml"):
            for peer_variant in ("-", "steps5"):
                steps = inner_steps(peer_variant)
                best = max((r for r in rows if r["impl"] == "metanmt" and r["family"] == family and r["algo"] == algo
                            and inner_steps(r["variant"]) == steps and "steps_per_s" in r),
                           key=lambda r: r["steps_per_s"], default=None)
                if best is None:
                    continue
                entry = {"family": family, "algo": algo, "inner_steps": steps, "metanmt_variant": best["variant"],
                         "metanmt_steps_per_s": best["steps_per_s"], "metanmt_peak_mb": best["peak_mb"]}
                for peer in ("learn2learn", "higher"):
                    other = find(peer, family, algo, peer_variant)
                    if other:
                        entry[f"speedup_vs_{peer}"] = best["steps_per_s"] / other["steps_per_s"]
                        entry[f"memory_vs_{peer}"] = best["peak_mb"] / other["peak_mb"]
                        lowest = min((r for r in rows if r["impl"] == "metanmt" and r["family"] == family
                                      and r["algo"] == algo and inner_steps(r["variant"]) == steps and "peak_mb" in r),
                                     key=lambda r: r["peak_mb"])
                        entry[f"lowest_memory_variant_vs_{peer}"] = {"variant": lowest["variant"],
                                                                     "memory": lowest["peak_mb"] / other["peak_mb"],
                                                                     "speed": lowest["steps_per_s"] / other["steps_per_s"]}
                if "meta_step_cost_in_plain_steps" in best and steps == 1:
                    entry["meta_step_cost_in_plain_steps"] = best["meta_step_cost_in_plain_steps"]
                if len(entry) > 6 or steps == 1:
                    ratios.append(entry)
                    print(json.dumps(entry))
    profiles = [] if args.no_profile else run_profiles(
        [c for c in PROFILE_CASES if (not args.family or c[0] in args.family) and (not args.algo or c[1] in args.algo)
         and (not args.impl or "metanmt" in args.impl)], args.profile_threads, args.profile_steps)
    result = {"rows": rows, "ratios": ratios, "profile": profiles, "settings": SETTINGS, "steps": args.steps,
              "warmup": args.warmup,
              "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
                           "machine": platform.machine()}, "versions": info}
    if args.out.exists() and (args.family or args.algo or args.impl):  # a partial run updates its rows only
        old = json.loads(args.out.read_text())
        done = {(r["impl"], r["family"], r["algo"], r["variant"]) for r in rows}
        result["rows"] = [r for r in old["rows"] if (r["impl"], r["family"], r["algo"], r["variant"]) not in done] + rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
