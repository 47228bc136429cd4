"""Reference in-context regression algorithms the trained model is compared with (PAPER.md §1).

Each function returns, for every position i, the prediction of ``y_i`` from the i earlier pairs
``(x_0, y_0) ... (x_{i-1}, y_{i-1})``, the same information the causal model has at the x_i token.
Position 0 has no examples; every estimator predicts 0 there.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def least_squares_predictions(xs: torch.Tensor, ys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum-norm least squares on each prefix, optionally restricted to the active dims.

    With ``mask`` the true basis (B, D), this is the "knows the concept" r-dim solver: exact after r
    noiseless examples. Without it, the D-dim solver that needs D examples.

    Args:
        xs: (B, n, D) inputs.
        ys: (B, n) targets.
        mask: Optional (B, D) 0/1 mask of the dims the solver may use.

    Returns:
        (B, n) predictions.

    """
    xs, ys = xs.double(), ys.double()
    if mask is not None:
        xs = xs * mask.double()[:, None, :]
    preds = torch.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        w = torch.linalg.pinv(xs[:, :i]) @ ys[:, :i, None]  # (B, D, 1): min-norm solution
        preds[:, i] = (xs[:, i : i + 1] @ w)[:, 0, 0]
    return preds.float()


def lasso_predictions(xs: torch.Tensor, ys: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """scikit-learn LASSO (no intercept) fitted on each prefix: the sparse solver that needs no basis.

    Args:
        xs: (B, n, D) inputs.
        ys: (B, n) targets.
        alpha: L1 penalty.

    Returns:
        (B, n) predictions.

    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    x, y = xs.double().numpy(), ys.double().numpy()
    preds = np.zeros_like(y)
    model = Lasso(alpha=alpha, fit_intercept=False, max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for b in range(x.shape[0]):
            for i in range(1, x.shape[1]):
                model.fit(x[b, :i], y[b, :i])
                preds[b, i] = model.predict(x[b, i : i + 1])[0]
    return torch.from_numpy(preds).float()


def reference_errors(batch: dict[str, torch.Tensor], lasso_alpha: float = 0.01) -> dict[str, torch.Tensor]:
    """Squared error per example and position of every reference algorithm that applies to ``batch``.

    Returns:
        Name -> (B, n) squared errors: ``least_squares_full_dims`` and ``lasso`` always,
        ``least_squares_true_basis`` when the batch carries its basis ``mask``.

    """
    xs, ys = batch["xs"], batch["ys"]
    out = {
        "least_squares_full_dims": (least_squares_predictions(xs, ys) - ys) ** 2,
        "lasso": (lasso_predictions(xs, ys, lasso_alpha) - ys) ** 2,
    }
    if "mask" in batch:
        out["least_squares_true_basis"] = (least_squares_predictions(xs, ys, batch["mask"]) - ys) ** 2
    return out
