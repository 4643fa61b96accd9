"""The learning curve of a translation run: dev NLL and dev chrF against sentence pairs seen.

    python bench/l10n_learning_curve.py ~/runs/frontier/multi [--every 600] [--name l10n_multitask_curve]

Scores every saved checkpoint of the run (``train.keep_checkpoints: 0`` keeps them all) the way
validation during meta-training does (``TranslationFamily.validate``: the dev language's NLL before
and after a short fine-tune on its 4k set, then chrF/BLEU of greedy translations of its dev
segments), after training instead of inside it, so the timed training holds no validation. Each
point is cached in the results file: a rerun scores only the new checkpoints, which makes it the
companion of a long run resumed over several sittings. Writes ``bench/results/NAME.json`` (one row
per checkpoint: step, pairs and tokens seen, training seconds, the dev scores) and ``NAME.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_rows(run: Path, every: int) -> list[tuple[int, Path]]:
    from metanmt.engine import checkpoint as ckpt

    return [(ckpt.checkpoint_step(path), path) for path in ckpt.list_checkpoints(run)
            if ckpt.checkpoint_step(path) % every == 0 and ckpt.checkpoint_problem(path) is None]


def score_checkpoint(loaded, path: Path) -> dict:
    from metanmt.engine.checkpoint import model_state

    loaded.model.load_state_dict(model_state(path))
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    metrics = loaded.family.validate(loaded.model)
    return {"step": trainer_state["step"], "pairs_seen": trainer_state["examples_seen"],
            "tokens_seen": trainer_state["tokens_seen"], "train_seconds": round(trainer_state["seconds"], 1),
            **{k: round(v, 4) for k, v in metrics.items() if k.startswith("dev_")}}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metanmt.evaluation.compare import save_figure

    pairs = [r["pairs_seen"] / 1000 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(pairs, [r["dev_loss_zero_shot"] for r in rows], marker="o", label="zero-shot")
    left.plot(pairs, [r["dev_loss"] for r in rows], marker="o", label="after the dev fine-tune")
    left.set_ylabel("dev NLL (nats/token)")
    left.legend(fontsize=8)
    right.plot(pairs, [r["dev_chrf"] for r in rows], marker="o", color="C2")
    right.set_ylabel("dev chrF (after the dev fine-tune)")
    for ax in (left, right):
        ax.set_xlabel("sentence pairs seen (thousands)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--every", type=int, default=1, help="score checkpoints whose step is a multiple of this")
    p.add_argument("--name", default="l10n_multitask_curve")
    args = p.parse_args()
    from metanmt.engine.run import load_run

    out = ROOT / "bench" / "results" / f"{args.name}.json"
    run = args.run.expanduser().resolve()
    previous = json.loads(out.read_text()) if out.is_file() else {}
    cached = {r["step"]: r for r in previous.get("rows", [])} if previous.get("run") == run.name else {}
    todo = [(s, c) for s, c in checkpoint_rows(run, args.every) if s not in cached]
    if todo:
        loaded = load_run(run, double_backward=False)
    for step, path in todo:
        cached[step] = score_checkpoint(loaded, path)
        print(json.dumps(cached[step]), flush=True)
        rows = [cached[s] for s in sorted(cached)]
        config = loaded.cfg.to_dict()
        config["suite"] = Path(config["suite"]).name  # its file name: the absolute path of the run means nothing elsewhere
        result = {"run": run.name, "config": config, "rows": rows,
                  "validation": "TranslationFamily.validate: dev language ro, "
                                f"{loaded.cfg.task['dev_finetune_steps']}-update fine-tune on its {loaded.cfg.task['dev_budget']} set, "
                                f"first {loaded.cfg.task['dev_max_segments']} dev segments, greedy"}
        out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [cached[s] for s in sorted(cached)]
    if rows:
        plot(rows, out.with_suffix(".png"), f"{run.name}: multi-task init, validation on the dev language (ro)")
    print(f"{len(rows)} points in {out}")


if __name__ == "__main__":
    main()
