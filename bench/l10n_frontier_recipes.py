"""MetaNMT's mechanism against plain meta-learning and multi-task training, on the dev language (Romanian).

    OMP_NUM_THREADS=1 python bench/l10n_frontier_recipes.py --data-root ../shared/data/l10n \
        [--runs ~/runs/frontier] [--group mechanism|lora] [--adapt all emb+enc emb] [--only NAME ...]

Four initializations at equal compute, each the frontier multi-task run (``configs/l10n_frontier.yaml``,
``RUNS/multi``) at update 1,750 plus 250 updates of its own on the same episodes (1 language,
400 + 400 target tokens), fresh AdamW at the constant lr the multi-task run had reached there
(``configs/l10n_meta_frontier.yaml``), episode seed 1:

- ``frontier_multitask``: multi-task training continued (the control without the mechanism);
- ``frontier_fomaml``: the best meta recipe so far (first-order MAML, 3 Adam 3e-4 inner steps,
  support loss in the outer step) as shipped in ``configs/l10n_meta_frontier.yaml``;
- ``frontier_metanmt``: the same meta-learner with MetaNMT's mechanism (docs/language_embeddings.md):
  a language table reset every episode, a ULR whose queries and keys are the warm start's subword
  embeddings, the official inner loop's parameters (``fast``);
- ``frontier_multitask_lang``: multi-task training with the same tables, resets and ULR.

``--group lora`` trains LoRA adapters (r 8, alpha 16, peft's q/v projections) on the same frozen
warm start, with second-order MAML (the same inner loop, eager attention) and with the multi-task
objective (``frontier_lora_maml``, ``frontier_lora_multitask``); their fine-tunes adapt the adapters.

Then ``metanmt compare`` on the dev language only: fine-tune on ``ro`` 1k and 4k (nested prefixes),
Adam 3e-4, ~1,000-token batches, early stopping on dev NLL of 200 held-out ``ro.pool`` pairs (none in
a budget file, none in ``dev/ro``), greedy decoding of ``dev/ro``; the adaptation curve after 0, 10,
30 and 100 updates at the fixed lr; paired tests against the group's multi-task control (Holm
over the cells). One compare per fine-tuning preset (``--adapt``: all parameters, embeddings +
encoder, embeddings only; the LoRA group: its adapters), under ``RUNS/recipes_dev/<preset>``
(``lora-all``). Everything resumes: a rerun trains or scores only what is missing. The test
languages are never touched.

Appends one row per (recipe, budget, preset) to ``bench/results/meta_recipes.csv`` (the columns it
has, plus the budget, the preset and the curve) and the commands to ``bench/results/meta_recipes.json``;
each compare's report (results.csv / .md, the plots, the cells with their hypotheses and per-sentence
NLL, so ``metanmt compare --report-only`` recomputes it) is copied to
``bench/results/l10n_frontier_recipes/<preset>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
WARM_STEP = 1750
LANG_EMBEDDINGS = ["model.language_embeddings.enabled=true", "model.language_embeddings.reset=every_episode",
                   "model.language_embeddings.ulr.enabled=true", "model.language_embeddings.ulr.queries=shared",
                   "model.language_embeddings.ulr.num_keys=2000", "model.language_embeddings.ulr.tau=0.05"]
LORA = ['model.lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": null}']
FAST = 'algorithm.adapt=["model.encoder.layers.*","model.encoder.language_embeddings.tables.*",' \
       '"model.encoder.language_embeddings.ulr.A","model.decoder.*","model.shared.*","lm_head.*"]'

# name -> (overrides of configs/l10n_meta_frontier.yaml, algo label, inner steps, inner-loop label, description)
RECIPES: dict[str, tuple[list[str], str, int, str, str]] = {
    "frontier_multitask": (["algorithm.name=multitask"], "multitask", 0, "-",
                           "multi-task training continued for 250 updates (control without the mechanism)"),
    "frontier_fomaml": ([], "fomaml+sio", 3, "all", "first-order MAML, 3 Adam 3e-4 inner steps, support loss in the outer step"),
    "frontier_metanmt": ([*LANG_EMBEDDINGS, FAST], "fomaml+sio+lang+ulr", 3, "fast",
                         "frontier_fomaml with a language table reset every episode, the ULR and MetaNMT's inner loop"),
    "frontier_multitask_lang": (["algorithm.name=multitask", *LANG_EMBEDDINGS], "multitask+lang+ulr", 0, "-",
                                "frontier_multitask with the same tables, resets and ULR"),
    "frontier_lora_maml": ([*LORA, "algorithm.name=maml", "model.attn_implementation=eager"], "maml+sio+lora", 3, "lora",
                           "second-order MAML of LoRA adapters (r 8, q/v) on the frozen warm start, 3 Adam 3e-4 inner steps"),
    "frontier_lora_multitask": ([*LORA, "algorithm.name=multitask"], "multitask+lora", 0, "-",
                                "multi-task training of the same LoRA adapters on the frozen warm start"),
}
# group -> (its recipes, the reference of its paired tests, its fine-tuning presets); a LoRA init's
# fine-tune adapts its adapters (the base is frozen), so that group has the one preset
GROUPS = {
    "mechanism": (["frontier_multitask", "frontier_fomaml", "frontier_metanmt", "frontier_multitask_lang"],
                  "frontier_multitask", ["all", "emb+enc", "emb"]),
    "lora": (["frontier_lora_multitask", "frontier_lora_maml"], "frontier_lora_multitask", ["all"]),
}
CURVE = [0, 10, 30, 100]
COLUMNS = ["recipe", "algo", "inner_steps", "adapt", "warm_start", "pairs_seen", "seconds", "dev_bleu", "dev_chrf",
           "dev_nll", "budget", "finetune", "n_seeds", "p_bleu", "p_chrf", "p_nll",
           *[f"nll_at_{k}" for k in CURVE], *[f"chrf_at_{k}" for k in CURVE]]


def train(name: str, out: Path, data_root: Path, warm: Path, extra: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """``metanmt meta-train`` of one recipe, warm-started from ``warm``, into ``out`` (a rerun resumes
    it); ``extra``: more config overrides (steps, learning rate)."""
    overrides, *_ = RECIPES[name]
    cmd = [sys.executable, "-m", "metanmt", "meta-train", str(ROOT / "configs" / "l10n_meta_frontier.yaml"),
           "--output-dir", str(out), "--set", f"data.root={data_root}", "--set", f"model.pretrained={warm}"]
    for item in (*overrides, *extra):
        cmd += ["--set", item]
    if (out / "metanmt.yaml").is_file():
        from metanmt.engine.checkpoint import run_finished

        cmd.append("--resume")
        if run_finished(out):
            return out, cmd
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out, cmd


def dev_compare(group: str, names: list[str], runs: Path, data_root: Path, dev: Path, adapt: str, seeds: int) -> dict:
    from metanmt.adaptation.recipe import FinetuneRecipe
    from metanmt.evaluation.compare import compare

    recipe = FinetuneRecipe(adapt=adapt, lr=3e-4, max_tokens=1000, dev_metric="loss", patience=3)
    return compare([(n, str(runs / "recipes" / n)) for n in names], data_root, ["ro"], ["1k", "4k"], seeds=seeds,
                   out=dev_folder(runs, group, adapt), recipe=recipe, scratch=False, dev=str(dev),
                   test_pattern="dev/{lang}.tsv.gz", num_beams=1, curve=CURVE,
                   reference=GROUPS[group][1] if GROUPS[group][1] in names else None)


def dev_folder(runs: Path, group: str, adapt: str) -> Path:
    return runs / "recipes_dev" / (adapt if group == "mechanism" else f"{group}-{adapt}")


def csv_rows(report_dir: Path, adapt: str, seconds: dict[str, float]) -> list[dict]:
    """One meta_recipes.csv row per (init, budget) of a compare report (means over its seeds)."""
    import numpy as np

    by_cell: dict[tuple[str, str], list[dict]] = {}
    for row in csv.DictReader((report_dir / "results.csv").open()):
        by_cell.setdefault((row["init"], row["budget"]), []).append(row)
    out = []
    for (init, budget), rows in sorted(by_cell.items()):
        _, algo, inner_steps, inner_adapt, _ = RECIPES[init]
        mean = lambda key: f"{np.mean([float(r[key]) for r in rows]):.4f}" if all(r.get(key) for r in rows) else ""  # noqa: E731
        first = rows[0]
        out.append({"recipe": init, "algo": algo, "inner_steps": inner_steps, "adapt": inner_adapt,
                    "warm_start": f"frontier multitask@{WARM_STEP}", "pairs_seen": first["init_pairs"],
                    "seconds": f"{seconds.get(init, float(first['init_seconds'] or 0)):.1f}",
                    "dev_bleu": mean("bleu"), "dev_chrf": mean("chrf"), "dev_nll": mean("nll"), "budget": budget,
                    "finetune": adapt, "n_seeds": len(rows), "p_bleu": first["p_bleu"], "p_chrf": first["p_chrf"],
                    "p_nll": first["p_nll"], **{c: mean(c) for c in COLUMNS if c.startswith(("nll_at_", "chrf_at_"))}})
    return out


def write_rows(path: Path, new: list[dict]) -> None:
    """Merge into ``path`` (meta_recipes.csv): rows keyed by (recipe, budget, fine-tuning preset), a new row
    replacing the old one of its key; rows from before these columns count as 4k, all parameters."""
    old = list(csv.DictReader(path.open())) if path.is_file() else []
    key = lambda r: (r["recipe"], r.get("budget") or "4k", r.get("finetune") or "all")  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in merged.values():
            writer.writerow({c: row.get(c, "") for c in COLUMNS})


def record(section: str, key: str, value: dict) -> None:
    """``meta_recipes.json[section][key] = value``, the file read anew each time, so that two groups
    running side by side do not overwrite each other's entries."""
    path = RESULTS / "meta_recipes.json"
    info = json.loads(path.read_text()) if path.is_file() else {"recipes": {}}
    info.setdefault(section, {})[key] = value
    path.write_text(json.dumps(info, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--runs", type=Path, default=Path.home() / "runs" / "frontier", help="run folders (outside the checkout)")
    p.add_argument("--group", choices=list(GROUPS), default="mechanism",
                   help="mechanism: MetaNMT's mechanism and its controls; lora: LoRA-MAML against LoRA multi-task")
    p.add_argument("--only", nargs="+", choices=list(RECIPES), help="train and score only these recipes of the group")
    p.add_argument("--adapt", nargs="+", help="fine-tuning presets, in this order (default: the group's)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per cell (default %(default)s)")
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args()
    data_root, runs = args.data_root.resolve(), args.runs.expanduser().resolve()
    group, _, presets = GROUPS[args.group]
    names = [n for n in group if not args.only or n in args.only]

    from l10n_frontier import exported, held_out_dev
    from metanmt.engine.checkpoint import latest_trainer_state

    warm = exported(runs, WARM_STEP)
    seconds = {}
    for name in names:
        run, cmd = train(name, runs / "recipes" / name, data_root, warm)
        own = latest_trainer_state(run)["seconds"]  # this stage's training
        seconds[name] = own + json.loads((warm / "trainer_state.json").read_text()).get("seconds", 0.0)
        record("recipes", name, {"command": " ".join(cmd[1:]).replace(" --resume", ""), "description": RECIPES[name][4],
                                 "own_seconds": own, "warm_start_seconds": seconds[name] - own})
    if args.train_only:
        return 0
    dev = runs / "ro_dev.tsv.gz"
    if not dev.is_file():
        held_out_dev(data_root, dev, lang="ro")
    for adapt in args.adapt or presets:
        folder = dev_folder(runs, args.group, adapt)
        dev_compare(args.group, names, runs, data_root, dev, adapt, args.seeds)
        write_rows(RESULTS / "meta_recipes.csv", csv_rows(folder, adapt, seconds))
        keep = RESULTS / "l10n_frontier_recipes" / folder.name  # the report and its cells, not the work folders
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(folder, keep, ignore=shutil.ignore_patterns("work", "*.lock"))
        record("frontier_dev", folder.name, {"report": str(keep.relative_to(ROOT)), "runs": str(folder)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
