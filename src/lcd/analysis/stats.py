"""Statistics of analyses: the CD-vs-accuracy line fit (PAPER.md §4's R²)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["linear_fit"]


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line ``y = slope * x + intercept`` and its R² (``nan`` if x or y is constant).

    Returns:
        (slope, intercept, r2).

    """
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if len(xt) < 2 or xt.std() == 0:
        return float("nan"), float(yt.mean()) if len(yt) else float("nan"), float("nan")
    slope = ((xt - xt.mean()) * (yt - yt.mean())).sum() / ((xt - xt.mean()) ** 2).sum()
    intercept = yt.mean() - slope * xt.mean()
    ss_tot = ((yt - yt.mean()) ** 2).sum()
    r2 = 1 - ((yt - slope * xt - intercept) ** 2).sum() / ss_tot if ss_tot > 0 else torch.tensor(float("nan"))
    return float(slope), float(intercept), float(r2)
