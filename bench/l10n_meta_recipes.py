"""Try the meta-learning levers on the dev language (Romanian) against the multi-task baseline.

    python bench/l10n_meta_recipes.py [--data-root ../shared/data/l10n] [--only NAME ...] [--list]

Every recipe is a ``metanmt meta-train`` run (``accelerate launch``, 2 processes of one thread)
followed by the comparison's own dev check: fine-tune on ``finetune/ro.4k`` with the recipe that
``bench/l10n_compare.py`` uses for every init (all parameters, Adam 3e-4, 10 epochs), then greedy
BLEU / chrF and the NLL of ``dev/ro.tsv.gz``, through ``metanmt compare`` (so nothing is scored
differently here). The test languages are never touched.

Equal compute: ``pairs_seen`` counts every sentence pair the initialization was trained on. The
"warm" recipes start from the multi-task run's step-300 checkpoint (156K pairs) and add 50 steps
(~26K pairs) of their own; the ``warm_multitask`` control continues multi-task training from the
same checkpoint for the same 50 steps with the same fresh optimizer, so a warm recipe is compared
with it (equal pairs, equal tokens), not with an optimizer restart. The "small" recipes compare
exact second-order MAML with its first-order approximation on a model small enough for it.
``seconds`` is the wall time of all training behind the init (the warm start's included).

``--final`` then picks the best warm recipe (the lowest dev NLL; within 0.01 nats of it, the highest
dev chrF: BLEU at this scale moves by fine-tuning noise), copies its run to ``runs/l10n/meta_warm``
and continues it to twice its steps, so that it has seen the same pairs as the 400-step baseline,
for ``bench/l10n_compare.py --init meta=runs/l10n/meta_warm``.

A finished recipe (its row in the CSV) is skipped; a killed meta-training run is resumed.
Writes ``bench/results/meta_recipes.csv`` (one row per recipe) and ``meta_recipes.json`` (the
commands, the adaptation gain the trainer logged, the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COLUMNS = ["recipe", "algo", "inner_steps", "adapt", "warm_start", "pairs_seen", "seconds", "dev_bleu", "dev_chrf", "dev_nll"]

EMB_ENC = '["model.shared.*","model.encoder.*"]'
# the inner loop of the warm recipes is the fine-tuning recipe itself: Adam at the fine-tuning lr
FT_INNER = ["algorithm.inner_optimizer=adam", "algorithm.inner_lr=0.0003"]
# a warm start continues at about the lr the baseline had reached at step 300 (inverse_sqrt: 5e-4*sqrt(100/300))
WARM_OPTIM = ["optim.schedule=constant", "optim.lr=0.0003", "optim.warmup_steps=10", "train.steps=50",
              "train.seed=1"]  # seed 1: not the episodes the warm start already saw (seed 0)
SMALL = ["model.d_model=128", "model.encoder_layers=2", "model.decoder_layers=2", "model.ffn_dim=512",
         "model.attention_heads=4", "train.steps=150"]

# name -> (config, overrides, warm start?, description)
RECIPES: dict[str, tuple[str, list[str], bool, str]] = {
    "multitask_400": ("multitask", [], False, "the baseline: 400 multi-task steps (runs/l10n/multitask)"),
    "fomaml_400_naive": ("fomaml", [], False, "the first version: FOMAML, 1 SGD 0.3 inner step, 400 steps (runs/l10n/fomaml)"),
    "warm_multitask": ("multitask", WARM_OPTIM, True, "control: 300 multi-task steps + 100 more with a fresh optimizer"),
    "warm_fomaml_3adam_sio": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.inner_steps=3", "algorithm.support_in_outer=true"],
                              True, "FOMAML, 3 Adam 3e-4 inner steps, support loss also in the outer step"),
    "warm_reptile_2adam": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.name=reptile", "algorithm.inner_steps=2"],
                           True, "Reptile, 2 Adam 3e-4 steps on support+query, outer AdamW"),
    "warm_fomaml_3adam_embenc": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.inner_steps=3", "algorithm.support_in_outer=true",
                                            f"algorithm.adapt={EMB_ENC}"],
                                 True, "as warm_fomaml_3adam_sio, inner loop adapts embeddings + encoder only (MetaNMT)"),
    "warm_metasgd_mamlpp": ("fomaml", [*WARM_OPTIM, "algorithm.inner_optimizer=sgd", "algorithm.inner_lr=0.1",
                                       "algorithm.inner_steps=3", "algorithm.meta_sgd=true", "algorithm.multi_step_loss=true"],
                            True, "first-order Meta-SGD (learned per-parameter SGD lr, from 0.1) + MAML++ multi-step query loss, 3 steps"),
    "warm_fomaml_3adam_sio_temp_mb8": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.inner_steps=3", "algorithm.support_in_outer=true",
                                                  "task.task_sampling=temperature", "task.temperature=5.0",
                                                  "train.meta_batch_size=8", "train.steps=25"],
                                       True, "as warm_fomaml_3adam_sio with temperature-5 language sampling and 8 languages per "
                                             "meta-batch (25 steps: the same pairs)"),
    "warm_fomaml_5adam_sio": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.inner_steps=5", "algorithm.support_in_outer=true"],
                              True, "as warm_fomaml_3adam_sio with 5 inner steps"),
    "warm_fomaml_3adam_sio_mb8": ("fomaml", [*WARM_OPTIM, *FT_INNER, "algorithm.inner_steps=3", "algorithm.support_in_outer=true",
                                             "train.meta_batch_size=8", "train.steps=25"],
                                  True, "as warm_fomaml_3adam_sio with 8 languages per meta-batch (25 steps: the same pairs)"),
    "small_maml2_cold": ("fomaml", [*SMALL, "algorithm.name=maml", "algorithm.inner_steps=1", "algorithm.inner_optimizer=sgd",
                                    "algorithm.inner_lr=0.3", "model.attn_implementation=eager"],
                         False, "small model (d128, 2+2 layers), exact second-order MAML, 150 steps from scratch"),
    "small_fomaml_cold": ("fomaml", [*SMALL, "algorithm.inner_steps=1", "algorithm.inner_optimizer=sgd", "algorithm.inner_lr=0.3",
                                     "model.attn_implementation=eager"],
                          False, "small_maml2_cold with the first-order approximation"),
    "small_multitask_cold": ("multitask", [*SMALL, "model.attn_implementation=eager"], False,
                             "small model, multi-task, 150 steps from scratch"),
    # MetaNMT's mechanism (docs/language_embeddings.md): a per-language source table reset every episode
    # + a ULR from corpus vectors; each with its multi-task control (same tables, resets and ULR)
    "metanmt_lang_ulr": ("metanmt", [], False, "FOMAML 3 Adam 3e-4 steps + sio, language tables reset every episode + "
                                               "ULR, the official inner loop's parameters, 400 steps from scratch"),
    "multitask_lang_ulr": ("multitask_lang", [], False, "multi-task with the same tables, resets and ULR, 400 steps"),
    "warm_metanmt_lang_ulr": ("metanmt", [*WARM_OPTIM, "model.language_embeddings.ulr.queries=shared"], True,
                              "metanmt_lang_ulr from the multi-task warm start (fresh tables; ULR queries and keys "
                              "from the warm start's subword embeddings)"),
    "warm_multitask_lang_ulr": ("multitask_lang", [*WARM_OPTIM, "model.language_embeddings.ulr.queries=shared"], True,
                                "control: warm_multitask with the same tables, resets and ULR"),
}
EXISTING = {"multitask_400": "multitask", "fomaml_400_naive": "fomaml"}  # already trained by bench/l10n_meta_train.py


def export_warm_start(runs: Path, step: int) -> Path:
    """The multi-task run's step-``step`` checkpoint as a ``save_pretrained`` folder for ``model.pretrained``
    (with its trainer state, so that compare counts the warm start's compute)."""
    from metanmt.engine.run import export_checkpoint

    folder = runs / "recipes" / f"_multitask_step{step}"
    if not ((folder / "config.json").is_file() and (folder / "trainer_state.json").is_file()):
        export_checkpoint(runs / "multitask", step, folder)
    return folder


def meta_train(name: str, args: argparse.Namespace, warm: Path | None) -> tuple[Path, list[str]]:
    config, overrides, _, _ = RECIPES[name]
    out = args.runs / "recipes" / name
    from l10n_meta_train import metanmt_command  # bench/ is on sys.path when a bench script runs

    cmd = [*metanmt_command(2), "meta-train", str(ROOT / "configs" / f"l10n_{config}.yaml"), "--output-dir", str(out), "--set", f"data.root={args.data_root}",
           "--set", "train.eval_every=0", "--set", "train.save_every=25"]
    for item in overrides:
        cmd += ["--set", item]
    if warm is not None:
        cmd += ["--set", f"model.pretrained={warm}"]
    if (out / "metanmt.yaml").is_file():
        cmd.append("--resume")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, cwd=ROOT)
    return out, cmd


def dev_check(name: str, run: Path, args: argparse.Namespace) -> dict:
    """The comparison's recipe on the dev language: fine-tune on ro 4k, score dev/ro (greedy)."""
    from metanmt.adaptation.recipe import FinetuneRecipe
    from metanmt.evaluation.compare import compare

    recipe = FinetuneRecipe(adapt=args.dev_adapt, lr=3e-4, max_tokens=1000, epochs=10, max_steps=150, seed=0)
    report = compare([(name, str(run))], args.data_root, [args.dev_lang], ["0", args.dev_budget], seeds=1,
                     out=args.runs / "recipes" / "_dev" / name, recipe=recipe, scratch=False,
                     test_pattern="dev/{lang}.tsv.gz", num_beams=1, max_test_segments=args.dev_segments)
    return {r["budget"]: r for r in report["rows"]}


def adapt_label(patterns: list[str] | None) -> str:
    """The inner loop's parameters in words: all, emb+enc, fast (MetaNMT's inner loop) or the patterns."""
    from metanmt.adaptation.recipe import ADAPT_PRESETS

    if patterns in (None, ["*"]):
        return "all"
    if patterns == ADAPT_PRESETS["emb+enc"]:
        return "emb+enc"
    if patterns == ADAPT_PRESETS["fast"]:
        return "fast"
    return ",".join(patterns)


def best_warm_recipe(rows: list[dict]) -> dict:
    """The lowest dev NLL among the warm meta-learning recipes; within 0.01 nats of it, the highest chrF."""
    candidates = [r for r in rows if r["warm_start"] != "none" and r["algo"] != "multitask"]
    lowest = min(float(r["dev_nll"]) for r in candidates)
    return max((r for r in candidates if float(r["dev_nll"]) <= lowest + 0.01), key=lambda r: float(r["dev_chrf"]))


def continue_best(rows: list[dict], recipes: dict, runs: Path) -> int:
    best = best_warm_recipe(rows)
    record = recipes[best["recipe"]]
    final = runs / "meta_warm"
    if not final.exists():
        shutil.copytree(runs / "recipes" / best["recipe"], final)
    cmd = record["command"].split()
    cmd[cmd.index("--output-dir") + 1] = str(final)
    cmd += [*([] if "--resume" in cmd else ["--resume"]), "--set", f"train.steps={2 * int(record['own_steps'])}"]
    print(f"best: {best}\n+ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, cwd=ROOT)
    print(f"next: python bench/l10n_compare.py --init meta={final} --init multi={runs / 'multitask'} ...")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "l10n")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "l10n")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES))
    parser.add_argument("--dev-lang", default="ro")
    parser.add_argument("--dev-budget", default="4k")
    parser.add_argument("--dev-segments", type=int, default=500)
    parser.add_argument("--warm-step", type=int, default=300)
    parser.add_argument("--dev-adapt", default="all",
                        help="what the dev fine-tune adapts (all, emb+enc, emb, lang, fast: metanmt.adaptation.recipe); "
                             "other than all, the rows are named RECIPE@ft-ADAPT")
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--final", action="store_true", help="continue the best warm recipe to equal compute (see above)")
    args = parser.parse_args()
    if args.list:
        for name, (config, overrides, warm, text) in RECIPES.items():
            print(f"{name}: {text}\n    configs/l10n_{config}.yaml {' '.join(overrides)}{' + warm start' if warm else ''}")
        return 0
    args.data_root, args.runs = args.data_root.resolve(), args.runs.resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from metanmt.adaptation.loading import meta_training_state
    from metanmt.config import read_yaml
    from metanmt.engine.checkpoint import atomic_write_text
    from metanmt.engine.trainer import read_history

    csv_path, json_path = RESULTS / "meta_recipes.csv", RESULTS / "meta_recipes.json"
    rows = {r["recipe"]: r for r in csv.DictReader(csv_path.open())} if csv_path.is_file() else {}
    info = json.loads(json_path.read_text()) if json_path.is_file() else {"recipes": {}}
    if args.final:
        return continue_best(list(rows.values()), info["recipes"], args.runs)
    warm_dir = export_warm_start(args.runs, args.warm_step)
    for recipe_name in args.only or list(RECIPES):
        name = recipe_name if args.dev_adapt == "all" else f"{recipe_name}@ft-{args.dev_adapt}"
        if name in rows:
            continue
        config, overrides, warm, text = RECIPES[recipe_name]
        started = time.perf_counter()
        if recipe_name in EXISTING:
            run, cmd = args.runs / EXISTING[recipe_name], ["bench/l10n_meta_train.py"]
        else:
            run, cmd = meta_train(recipe_name, args, warm_dir if warm else None)
        state = meta_training_state(run)  # a warm start's compute included
        dev = dev_check(name, run, args)
        tuned, zero = dev[args.dev_budget], dev["0"]
        cfg = read_yaml(run / "metanmt.yaml")
        algo = cfg["algorithm"]
        lang = (cfg.get("model") or {}).get("language_embeddings") or {}
        pairs, seconds = state["examples_seen"], state["seconds"]
        rows[name] = {
            "recipe": name, "algo": algo["name"] + ("+meta_sgd" if algo.get("meta_sgd") else "")
            + ("+msl" if algo.get("multi_step_loss") else "") + ("+sio" if algo.get("support_in_outer") else "")
            + (f"+lang({lang.get('reset', 'every_episode')})" if lang.get("enabled") else "") + ("+ulr" if (lang.get("ulr") or {}).get("enabled") else ""),
            "inner_steps": 0 if algo["name"] == "multitask" else algo["inner_steps"],
            "adapt": "-" if algo["name"] == "multitask" else adapt_label(algo.get("adapt")),
            "warm_start": f"multitask@{args.warm_step}" if warm else "none", "pairs_seen": pairs, "seconds": round(seconds, 1),
            "dev_bleu": round(tuned["bleu"], 2), "dev_chrf": round(tuned["chrf"], 2), "dev_nll": round(tuned["nll"], 4),
        }
        train = read_history(run, "train")
        info["recipes"][name] = {
            "description": text, "command": " ".join(cmd), "run": str(run), "steps": state["step"],
            "tokens_seen": state["tokens_seen"], "own_steps": state.get("own", state)["step"],
            "final_train_loss": train[-1].get("loss") if train else None,
            "last_logged": train[-1] if train else None, "dev_zero_shot": {k: zero[k] for k in ("bleu", "chrf", "nll")},
            "dev_finetuned": {k: tuned[k] for k in ("bleu", "chrf", "nll", "steps", "finetune_seconds")},
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        }
        info.update({"dev": f"finetune/{args.dev_lang}.{args.dev_budget} -> dev/{args.dev_lang}.tsv.gz, "
                            f"{args.dev_segments} segments, greedy",
                     "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__, "meta_train_processes": 2})
        ordered = [r for n in RECIPES for key, r in rows.items() if key.split("@")[0] == n]
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(ordered)
        atomic_write_text(json_path, json.dumps(info, indent=2))
        print(json.dumps(rows[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
