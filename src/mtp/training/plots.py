"""Loss curves of a training run: metrics.jsonl -> PNG (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mtp.io import atomic_path


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a metrics.jsonl; lines cut off by a crash are skipped."""
    steps, evals = [], []
    path = Path(path)
    if not path.is_file():
        return steps, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (evals if "eval" in record else steps).append(record)
    return steps, evals


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


# Up to this many heads (offsets) each has a color of matplotlib's cycle and a line in the legend; past it (a
# self-distillation run of large k) they shade along a color map and the legend names a few, evenly spaced: a
# legend of dozens of lines would cover the panel (and leave tight_layout no room).
LEGEND_HEADS = 10


def head_style(j: int, heads: int) -> tuple[object, bool]:
    """(color, whether the legend names it) of head j of `heads`: one color a head in every panel."""
    if heads <= LEGEND_HEADS:
        return f"C{j}", True
    import matplotlib

    named = {round(i * (heads - 1) / (LEGEND_HEADS // 2 - 1)) for i in range(LEGEND_HEADS // 2)}
    return matplotlib.colormaps["viridis"](j / (heads - 1)), j in named


def tokens_per_forward_series(evals: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the held-out evaluations estimate a decoding forward emits, per evaluation step: verified drafts
    ("speculative": accepted while they agree, the figure both methods record) and, for self-distillation,
    ConfAdapt at each threshold it records. Labels -> [(step, tokens per forward)]; empty without estimates."""
    series: dict[str, list[tuple[int, float]]] = {}
    for e in evals:
        figures = e["eval"]
        if figures.get("tokens_per_forward_estimate") is not None:
            series.setdefault("speculative (verified drafts)", []).append(
                (e["step"], figures["tokens_per_forward_estimate"]))
        for tau, confadapt in (figures.get("confadapt") or {}).items():
            series.setdefault(f"ConfAdapt tau={tau}", []).append((e["step"], confadapt["tokens_per_forward_estimate"]))
    return series


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Training loss per head (thin: raw, thick: moving average), held-out loss/accuracy per head and, where the
    evaluations estimate it, tokens per forward (`tokens_per_forward_series`)."""
    steps, evals = read_metrics(metrics_path)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = max(len(r.get("head_loss", [])) for r in steps)
    per_forward = tokens_per_forward_series(evals)
    panels = 1 + bool(evals) + bool(per_forward)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels if panels > 1 else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    window = max(1, len(steps) // 50)
    for j in range(n):
        xs = [r["step"] for r in steps if j < len(r["head_loss"]) and r["head_loss"][j] is not None]
        ys = [r["head_loss"][j] for r in steps if j < len(r["head_loss"]) and r["head_loss"][j] is not None]
        if not xs:
            continue
        color, named = head_style(j, n)  # one color in both panels (a frozen head 0 has no training curve)
        ax.plot(xs, _smooth(ys, window), color=color, linewidth=1.8,
                label=f"head {j} (token t+{j + 1})" if named else "_nolegend_")
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.7)
        ev = [(e["step"], e["eval"]["head_loss"][j]) for e in evals if j < len(e["eval"]["head_loss"])]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o", color=color, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("training loss per head (dots: held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    last_step = max(r["step"] for r in steps + evals)
    if evals:
        _accuracy_panel(axes[0][1], evals, n, last_step)
    if per_forward:
        _tokens_per_forward_panel(axes[0][2], per_forward, last_step)
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return png_path


def _accuracy_panel(ax, evals: list[dict], heads: int, last_step: int) -> None:
    for j in range(heads):
        ev = [(e["step"], e["eval"]["head_accuracy"][j]) for e in evals if j < len(e["eval"]["head_accuracy"])]
        if ev:
            color, named = head_style(j, heads)
            ax.plot(*zip(*ev, strict=True), "o-", color=color, label=f"head {j}" if named else "_nolegend_",
                    markersize=4)
    ax.set_xlim(0, last_step * 1.03)  # the run's steps, even for one eval
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out top-1 accuracy per head")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _tokens_per_forward_panel(ax, series: dict[str, list[tuple[int, float]]], last_step: int) -> None:
    for i, (label, points) in enumerate(series.items()):
        ax.plot(*zip(*points, strict=True), "o-" if i == 0 else "s--", color="k" if i == 0 else f"C{i + 3}",
                label=label, markersize=4)
    ax.set_xlim(0, last_step * 1.03)
    ax.set_ylim(bottom=1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens per forward")
    ax.set_title("held-out tokens per forward (estimate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
