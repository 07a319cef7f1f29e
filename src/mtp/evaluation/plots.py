"""The benchmark's picture: speedup against accuracy, one labelled point per method (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from mtp.evaluation.bench import HF_GREEDY, OUR_GREEDY
from mtp.io import atomic_path

_COLORS = {"transformers": "tab:gray", "mtp": "tab:blue", "mtp-int8": "tab:green", "llama.cpp": "tab:orange"}


def plot_speed_accuracy(report: dict, path: str | Path) -> Path:
    """x: GSM8K flexible accuracy (%), or the share of outputs equal to our greedy when the prompts are not
    GSM8K; y: speedup against transformers greedy (against our greedy when transformers did not run).
    The greedy baselines are marked: a dashed line at the reference speed, a star on our greedy."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["methods"]
    scored = report.get("gsm8k_scored", False)
    y_key = "speedup_vs_hf_greedy" if any(r["method"] == HF_GREEDY for r in rows) else "speedup_vs_greedy"
    reference = "transformers greedy" if y_key == "speedup_vs_hf_greedy" else "our greedy"

    def x_of(r: dict) -> float | None:
        if scored:
            return 100.0 * r["accuracy_flexible"]
        if r.get("equal_to_greedy") is None or not r["prompts"]:
            return None
        return 100.0 * r["equal_to_greedy"] / r["prompts"]

    points = [(r, x_of(r), r.get(y_key)) for r in rows]
    points = [(r, x, y) for r, x, y in points if x is not None and y is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{reference} (1.0x)")
    for r, x, y in points:
        baseline = r["method"] in (HF_GREEDY, OUR_GREEDY)
        ax.scatter([x], [y], s=170 if baseline else 60, marker="*" if baseline else "o",
                   color=_COLORS.get(r["engine"], "tab:purple"), edgecolor="black", linewidth=0.6, zorder=3)
    for engine, color in _COLORS.items():
        if any(r["engine"] == engine for r in rows):
            ax.scatter([], [], color=color, edgecolor="black", linewidth=0.6, label=engine)
    ax.scatter([], [], marker="*", s=120, color="white", edgecolor="black", label="greedy baselines")
    if points:
        xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
        pad = max(2.0, 0.15 * (max(xs) - min(xs)))
        ax.set_xlim(max(-1.0, min(xs) - pad), min(101.0, max(xs) + 3 * pad))
        span = max(max(ys), 1.0) - min(min(ys), 1.0)
        ax.set_ylim(min(min(ys), 1.0) - 0.08 * span - 0.05, max(max(ys), 1.0) + 0.12 * span + 0.05)
        _place_labels(fig, ax, points)
    ax.set_xlabel("GSM8K accuracy, flexible-extract (%)" if scored else "outputs equal to our greedy (%)")
    ax.set_ylabel(f"speedup vs {reference} (median over prompts)")
    s = report.get("settings", {})
    title = "Speed vs accuracy"
    if s.get("model"):
        title += f": {s['model']}"
    ax.set_title(title, fontsize=10)
    n = rows[0]["prompts"] if rows else 0
    ax.text(0.01, 0.01, f"{n} prompts, {s.get('max_new_tokens', '?')} new tokens, "
            f"{report.get('machine', {}).get('threads', '?')} threads", transform=ax.transAxes, fontsize=7,
            color="dimgray")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _place_labels(fig, ax, points) -> None:
    """Label every point; labels of points that are close on screen are pushed apart vertically (with a thin
    line back to their point), since lossless methods share one accuracy and often similar speedups."""
    to_points = 72.0 / fig.dpi
    screen = ax.transData.transform([(x, y) for _, x, y in points])
    order = sorted(range(len(points)), key=lambda i: (screen[i][1], screen[i][0]))
    placed: list[tuple[float, float]] = []  # (x, label y) on screen, pixels
    label_y = {}
    for i in order:
        sx, sy = screen[i]
        y = sy
        for px, py in sorted(placed, key=lambda p: p[1]):
            if abs(px - sx) < 90 and y - py < 13:
                y = py + 13
        placed.append((sx, y))
        label_y[i] = y
    for i, (r, x, y) in enumerate(points):
        dy = (label_y[i] - screen[i][1]) * to_points
        name = r["method"] + (" (baseline)" if r["method"] == OUR_GREEDY else "")
        ax.annotate(name, (x, y), xytext=(9, dy - 3), textcoords="offset points", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.5} if abs(dy) > 4 else None)
