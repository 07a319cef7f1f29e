"""The benchmark's picture: speedup against accuracy, one labelled point per method (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from mtp.io import atomic_path

# The bench's reference rows (`mtp.evaluation.bench` names its methods with these): the plot's baselines.
HF_GREEDY = "hf-greedy"
OUR_GREEDY = "greedy"

_COLORS = {"transformers": "tab:gray", "mtp": "tab:blue", "mtp-int8": "tab:green", "llama.cpp": "tab:orange",
           "llama.cpp-inline": "tab:brown"}


def quality_axis(report: dict) -> tuple[str, str]:
    """(row key, axis label) of the plot's quality axis: GSM8K flexible accuracy when it tells the methods apart
    (some method scores above 0), else the per-token agreement with our greedy output (`bench_report.agreement`):
    a 135M model scores 0% on GSM8K, and a flat accuracy axis says nothing about what a lossy method loses."""
    rows = report["methods"]
    if report.get("gsm8k_scored") and any((r.get("accuracy_flexible") or 0) > 0 for r in rows):
        return "accuracy_flexible", "GSM8K accuracy, flexible-extract (%)"
    label = "tokens equal to our greedy output before the first difference (%)"
    if report.get("gsm8k_scored"):
        label += "; GSM8K accuracy is 0% for every method"
    return "agreement_with_greedy", label


def plot_speed_accuracy(report: dict, path: str | Path) -> Path:
    """x: `quality_axis` (GSM8K flexible accuracy, or the token agreement with our greedy when every accuracy is
    0 or the prompts are not GSM8K), in %; y: speedup against transformers greedy (against our greedy when
    transformers did not run). The greedy baselines are marked: a dashed line at the reference speed, a star on
    our greedy."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["methods"]
    x_key, x_label = quality_axis(report)
    y_key = "speedup_vs_hf_greedy" if any(r["method"] == HF_GREEDY for r in rows) else "speedup_vs_greedy"
    reference = "transformers greedy" if y_key == "speedup_vs_hf_greedy" else "our greedy"

    def x_of(r: dict) -> float | None:
        return None if r.get(x_key) is None else 100.0 * r[x_key]

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
    ax.set_xlabel(x_label)
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
