"""The study's report: ``report/report.md`` and a self-contained ``report/report.html`` (the plots
embedded, nothing to fetch) beside compare's ``results.csv``, ``results.md`` and plots.

It holds the settings (inits, warm starts, the equal-compute rule, the data's fingerprint), how the
inner loop and the fine-tuning length were chosen on the dev language, compare's tables (mean ± 95%
Student t interval with n, the gaps to the reference with Holm-corrected paired p-values, ``*``
where significant), the adaptation curve, the inits' training compute, and the learning curves of
the inits with the convergence check. Everything is computed from files in the study folder (no
clock, no host name), so rebuilding the report gives the same bytes.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Optional

from ..engine.checkpoint import read_history
from ..evaluation.compare import save_figure
from ..files import atomic_write_text
from .convergence import check as convergence_check
from .convergence import FORECAST_HORIZON, fitted_curve, one_line
from .folder import init_dir, read_json, report_dir, rule_file
from .spec import Study


def history(out: Path, name: str, kind: str) -> list[dict[str, Any]]:
    """The init's records of one kind ("train" or "validation"), the last one per step (a resumed run
    logs again from its checkpoint's step: :func:`read_history`)."""
    return read_history(init_dir(out, name), kind)


def offset_of(study: Study, name: str) -> int:
    """Updates before the init's own first update (its warm starts')."""
    warm = study.inits[name].warm_start
    return study.total_updates_at(warm) if warm else 0


def convergence(study: Study, out: Path, with_forecast: bool = True) -> Optional[dict[str, Any]]:
    """The reference's convergence check (:func:`.convergence.check`), or None without validation."""
    points = [(r["step"], r["dev_loss"]) for r in history(out, study.file.reference, "validation") if "dev_loss" in r]
    return convergence_check(points, study.inits[study.file.reference].optim.cooldown_from, with_forecast)


def convergence_line(study: Study, out: Path) -> str:
    return one_line(study.file.reference, convergence(study, out))


def plot_learning_curves(study: Study, out: Path, path: Path) -> Optional[Path]:
    """Training loss (mean of each logging window) and validation dev NLL against total updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(study.order()):
        offset, color = offset_of(study, name), colors[index % len(colors)]
        train = [(r["step"] + offset, r["loss"]) for r in history(out, name, "train") if "loss" in r]
        dev = [(r["step"] + offset, r["dev_loss"]) for r in history(out, name, "validation") if "dev_loss" in r]
        if train:
            left.plot(*zip(*train), color=color, label=name, linewidth=1)
            drawn = True
        if dev:
            right.plot(*zip(*dev), color=color, marker="o", label=name)
            drawn = True
            fit = (convergence(study, out) or {}).get("forecast") if name == study.file.reference else None
            if fit is not None:  # the forecast's law, from its first fitted update to where it passes (or 2x the run)
                steps, law = fitted_curve(fit, fit["flat_at"] or 2 * fit["fit_to"])
                right.plot([s + offset for s in steps], law, color=color, linestyle="--", linewidth=1,
                           label=f"{name}: power-law fit")
    if not drawn:
        plt.close(fig)
        return None
    left.set(xlabel="updates (warm start included)", ylabel="training loss (nats/token)", title="training")
    right.set(xlabel="updates (warm start included)", ylabel="dev NLL after validation's fine-tune",
              title=f"validation ({study.file.data.dev_lang})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path, 110)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def study_markdown(study: Study, out: Path) -> str:
    sf, record = study.file, read_json(out / "study.json")
    lines = [f"# Study `{study.name}`", ""]
    if sf.description:
        lines += [sf.description.strip(), ""]
    lines += ["## Settings", "",
              f"Test languages {', '.join(study.langs)}; budgets {', '.join(sf.budgets)} English words (0: zero-shot); "
              f"{sf.seeds} fine-tuning seeds, {sf.scratch_seeds} for the from-scratch row; beam {sf.decoding.beam}; "
              f"paired test `{sf.paired_test}` against `{sf.reference}`, Holm-corrected over the report. Data: "
              f"fingerprint `{record['data_fingerprint']}` (file names and sizes). Equal compute: `{sf.equal_compute}`"
              + (" (every init's updates, warm start included, equal the reference's, on episodes of one size)"
                 if sf.equal_compute == "updates" else "") + ".", ""]
    rows = []
    for name in study.order():
        init = study.inits[name]
        warm = f"{init.warm_start.init} at {init.warm_start.update:,}" if init.warm_start else "-"
        rows.append([f"`{name}`", f"`{init.config.name}` {' '.join(f'`{s}`' for s in init.overrides)}", warm,
                     f"{init.steps:,}", f"{study.total_updates(name):,}", init.inner])
    lines += _table(["init", "config and overrides", "warm start", "own updates", "updates in all", "inner loop"], rows)
    for path in sorted((out / "inner").glob("*.json")) if (out / "inner").is_dir() else []:
        info = read_json(path)
        c = info["choice"]
        lines += ["", f"## The inner loop of `{info['init']}`, chosen on {info['dev_lang']} at {info['warm_start']}", "",
                  f"{info['rule']}. Episodes from `{info['episodes_from']}` with `{info['init']}`'s episode sizes, "
                  f"{info['optimizer']} inner steps over `{info['adapt'] or 'the default'}`. Chosen: rate {c['lr']:g}, "
                  f"{c['steps']} step{'s' if c['steps'] != 1 else ''}, mean inner gain {c['gain']:+.4f} nats "
                  f"(95% t interval ± {c['ci95']:.4f}, n = {c['n']} episodes).", ""]
        lines += _table(["rate", "steps", "mean gain (nats)", "± 95% t", "episodes with a gain"],
                        [[f"{r['lr']:g}", r["steps"], f"{r['gain']:+.4f}", f"{r['ci95']:.4f}",
                          f"{r['positive_episodes']} of {r['n']}"] for r in info["candidates"]])
    if rule_file(out).is_file():
        info = read_json(rule_file(out))
        c = info["choice"]
        lines += ["", f"## The fine-tuning length, chosen on {study.file.data.dev_lang} with `{sf.reference}`", "",
                  f"{info['rule']} (`{info['dev']}`, {info['dev_segments']} segments, greedy). Chosen: {c['epochs']:g} "
                  f"epochs, at least {c['min_steps']} and at most {c['max_steps']} updates: "
                  + ", ".join(f"{n} updates at {b}" for b, n in c["updates"].items()) + ".", ""]
        lines += _table(["epochs", "min updates", "mean dev chrF", "updates in all"],
                        [[f"{s['epochs']:g}", s["min_steps"], f"{s['mean_chrf']:.2f}", s["total_updates"]]
                         for s in sorted(info["scored"], key=lambda s: -s["mean_chrf"])])
        curves = ["", "Dev chrF / NLL after k updates: " + "; ".join(
            f"{r['budget']} ({r['pairs']} pairs): " + ", ".join(f"{k}: {v['chrf']:.1f} / {v['nll']:.3f}"
                                                                for k, v in r["points"].items()) for r in info["runs"])]
        lines += curves
    results = report_dir(out) / "results.md"
    if results.is_file():
        text = results.read_text(encoding="utf-8")
        lines += ["", re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M).strip()]
    for png, caption in (("bleu_vs_budget.png", "BLEU against the budget"),
                         ("adaptation_curve.png", "test NLL and chrF against fine-tuning updates")):
        if (report_dir(out) / png).is_file():
            lines += ["", f"![{caption}]({png})"]
    lines += ["", "## Learning curves", ""]
    if (report_dir(out) / "learning_curves.png").is_file():
        lines += ["![training loss and validation dev NLL of the inits](learning_curves.png)", ""]
    check = convergence(study, out)
    if check is None:
        lines += [f"`{sf.reference}` has no validation records: its convergence is not checked (set train.eval_every)."]
    else:
        lines += [f"Convergence of `{sf.reference}` ({check['criterion']}): dev NLL {check['dev_loss_from']:.3f} at "
                  f"{check['from']:,} -> {check['dev_loss_to']:.3f} at {check['to']:,}, "
                  f"{check['fall_per_1000']:+.4f} nats per 1,000 updates: **{'flat' if check['flat'] else 'not flat'}**."]
        fit = check.get("forecast")
        if fit is not None:
            where = (f"puts the first update that passes it near **{fit['flat_at']:,}**"
                     if fit["flat_at"] is not None
                     else f"does not pass it within {FORECAST_HORIZON} times the updates trained")
            lines[-1] += (f" A power law fitted to its validations from update {fit['fit_from']:,} to "
                          f"{fit['fit_to']:,} (dev NLL = {fit['a']:.3f} + {fit['b']:.3f} (t/1000)^-{fit['c']:.3f}, "
                          f"n = {fit['n']}, rms residual {fit['rms']:.4f} nats) {where} (an extrapolation: dashed in "
                          "the learning curves).")
        if "cooldown_from" in check:
            start, end = check["cooldown_steps"]
            lines[-1] += (f" Its cooldown (the rate falling to 0 from update {check['cooldown_from']:,}) then took the dev "
                          f"NLL from {check['cooldown_loss_from']:.3f} at {start:,} to {check['cooldown_loss_to']:.3f} at "
                          f"{end:,}.")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3}code{background:#f6f6f6;padding:0 3px}img{max-width:100%}"""


def to_html(markdown_text: str, folder: Path, title: str) -> str:
    """The report as one HTML file: tables by python-markdown, every PNG embedded as a data URI."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")

    def embed(match: re.Match) -> str:
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"/]+\.png)"', embed, body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_study_report(study: Study, out: Path) -> Path:
    folder = report_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(study, out, folder / "learning_curves.png")
    text = study_markdown(study, out)
    atomic_write_text(folder / "report.md", text)
    atomic_write_text(folder / "report.html", to_html(text, folder, f"metanmt study {study.name}"))
    return folder / "report.html"
