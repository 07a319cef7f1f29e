"""loss.png: the panels a training run's metrics give, and what the tokens-per-forward panel reads."""

from __future__ import annotations

import json
import struct

from mtp.training.plots import plot_losses, read_metrics, tokens_per_forward_series


def _metrics(path, confadapt: bool, evals: bool = True):
    lines = [{"step": s, "head_loss": [None, 3.0 / s, 4.0 / s]} for s in range(1, 9)]
    for s in ((4, 8) if evals else ()):
        figures = {"head_loss": [0.5, 1.0, 2.0], "head_accuracy": [1.0, 0.5, 0.2],
                   "tokens_per_forward_estimate": 1 + s / 10}
        if confadapt:
            figures["confadapt"] = {"0.9": {"tokens_per_forward_estimate": 1 + s / 20},
                                    "0.5": {"tokens_per_forward_estimate": 1 + s / 8}}
        lines.append({"step": s, "eval": figures})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_self_distillation_runs_plot_confadapt_tokens_per_forward_beside_the_verified_estimate(tmp_path):
    metrics = _metrics(tmp_path / "m.jsonl", confadapt=True)
    series = tokens_per_forward_series(read_metrics(metrics)[1])
    assert series == {"speculative (verified drafts)": [(4, 1.4), (8, 1.8)],
                      "ConfAdapt tau=0.9": [(4, 1.2), (8, 1.4)], "ConfAdapt tau=0.5": [(4, 1.5), (8, 2.0)]}
    widths = {}
    for name, kw in (("sd", {"confadapt": True}), ("heads", {"confadapt": False}), ("none", {"confadapt": False,
                                                                                          "evals": False})):
        png = plot_losses(_metrics(tmp_path / f"{name}.jsonl", **kw), tmp_path / f"{name}.png")
        widths[name] = _png_width(png)
    # three panels of 6 inches at 110 dpi where evaluations estimate tokens per forward (heads too); 7 inches for
    # the one panel of a run without evaluations
    assert widths == {"sd": 3 * 6 * 110, "heads": 3 * 6 * 110, "none": 7 * 110}
    assert tokens_per_forward_series([]) == {}


def test_many_heads_shade_along_a_color_map_and_the_legend_names_a_few(tmp_path, monkeypatch):
    """A self-distillation run of k 300 plotted 300 legend lines: matplotlib warned that tight_layout found no room,
    and the legend hid the panel. Past LEGEND_HEADS heads the legend names five, evenly spaced, first and last
    among them; each head keeps one color in both panels."""
    import warnings

    import matplotlib.figure

    from mtp.training.plots import LEGEND_HEADS, head_style

    heads = 40
    lines = [{"step": s, "head_loss": [3.0 / s + j for j in range(heads)]} for s in range(1, 5)]
    lines.append({"step": 4, "eval": {"head_loss": [1.0] * heads, "head_accuracy": [0.5] * heads}})
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    legends = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        legends.extend([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_losses(metrics, tmp_path / "loss.png").is_file()
    named = [0, 10, 20, 29, 39]
    assert legends == [[f"head {j} (token t+{j + 1})" for j in named], [f"head {j}" for j in named]]
    assert [head_style(j, heads)[1] for j in range(heads)].count(True) == LEGEND_HEADS // 2
    assert len({str(head_style(j, heads)[0]) for j in range(heads)}) == heads  # one color a head
    assert head_style(3, LEGEND_HEADS) == ("C3", True)
