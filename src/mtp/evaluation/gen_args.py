"""Generation arguments as other evaluation tools spell them, mapped onto mtp's (no lm-eval import needed)."""

from __future__ import annotations

from typing import Any

_FORK_STRATEGIES = {"conf_adapt": "confadapt", "confadapt": "confadapt", "static": "static", "greedy": "greedy",
                    "speculative": "speculative"}


def fork_arguments(strategy: Any, tau: Any, k: Any, kwargs: dict) -> tuple[str, float, Any, int | None]:
    """Also take the gen arguments of the mtp-lm lm-eval fork (the self-distillation paper's authors):
    `do_mtp`, `k_toks`, `strategy=[conf_adapt, 0.9]` (or "conf_adapt 0.9"), `mask_id`.
    Returns (strategy, tau, k, mask token id)."""
    do_mtp = kwargs.pop("do_mtp", None)
    k_toks = kwargs.pop("k_toks", None)
    mask_id = kwargs.pop("mask_id", None)
    if isinstance(strategy, str):
        parts = strategy.strip("[]()").replace(",", " ").split()
    else:
        parts = [str(x) for x in strategy]
    name = parts[0] if parts else "greedy"
    name = _FORK_STRATEGIES.get(name, name)
    if len(parts) > 1:
        tau = float(parts[1])
    if k_toks not in (None, "", "None"):
        k = int(k_toks)
    if str(do_mtp).lower() == "false":
        name = "greedy"
    return name, float(tau), k, None if mask_id in (None, "", "None") else int(mask_id)
