"""Exact leave-one-out nearest neighbours: the engine under :mod:`lcd.decodability`.

The neighbours are those of a float64 evaluation of sum_k (x_ik - x_jk)^2, so k-NN predictions built on
them equal scikit-learn's float64 ``KNeighborsClassifier`` under ``LeaveOneOut``; ties in distance go to
the lower index.

How the distances stay exact and fast. Residual streams of LLMs carry a large component shared by all
prompts and a few massive dimensions: Gemma 3 270M's layer 0 has vectors of norm ~1,300 whose pairwise
distances are ~0.3. The textbook float32 expansion |x_i|^2 - 2 x_i.x_j + |x_j|^2 cancels away every
significant digit there (79 of 105 predictions wrong). So each layer is

1. centred (distances are translation-invariant, so the shared component goes away) and scaled by a
   power of two (exact; nothing over- or underflows, whatever the features' magnitude);
2. ranked by one float32 Gram matrix (BLAS syrk on the CPU: half the flops of a GEMM), and each point's
   k nearest are *certified* with a rigorous forward-error bound of that arithmetic (gamma_d |y_i| |y_j|
   for the dot product in any summation order, plus the roundings around it and the float64 reference's
   own): the set stands when the k-th neighbour's upper bound lies below every other point's lower bound;
3. rows the float32 bound cannot certify (massive dimensions that survive centring, near-ties: ~5% of
   random data) are redone against all points with a float64 Gram matrix and its bound, and rows still
   open (exact or 1e-13-close ties) are settled by the direct float64 sum over the few candidates the
   bound leaves, ties to the lower index.

The result is the float64 reference's exactly for float32 (or narrower) features; for float64 features
up to float64's own rounding. Measured with ``benchmarks/cd_speed.py --threads 1 --alternatives`` (18
layers x 1,300 points x 640 dims, one thread of a shared 2-core AMD EPYC, medians of 7 interleaved
runs): the float32 expansion 0.90 s, wrong on 21,399 of 23,400 predictions with a 1e4 offset and 11,848
with three massive dimensions (0 / 1e4 / 2e4 per point); centring plus float32 syrk 0.45 s, still wrong
on 1 and 10,967 of them; centring plus float64 syrk 0.71 s, right on both but with no guarantee; this
route 0.54 s and provably right (1.1 s on the massive-dimension data, where every row needs float64),
against 1.16 s for scikit-learn's fastest leave-one-out route (``NearestNeighbors.kneighbors()``). On
the CPU the Gram matrices come from numpy's OpenBLAS (float32 syrk of all 18 layers 0.26 s, against 0.80 s
for torch's batched MKL GEMM on this AMD CPU); on a GPU from torch, with TF32 switched off for the call
since the bound assumes true float32 products.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["loo_neighbours"]

_U32, _U64 = 2.0**-24, 2.0**-53  # unit roundoffs of float32 and float64


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term dot product."""
    return n * u / (1 - n * u)


def _bound(n_i: torch.Tensor, n_j: torch.Tensor, d: int, u: float, sq_err: float) -> torch.Tensor:
    """Rigorous bound on |computed - reference| of ``R_ij = |y_j|^2 - 2 y_i.y_j`` (float64 tensors).

    ``R`` plus the row constant |y_i|^2 is the squared distance, so bounds on ``R`` order the neighbours.
    ``n_i``, ``n_j`` are the norms of the centred, scaled points, ``u`` the unit roundoff of the Gram
    matrix's arithmetic and ``sq_err`` the relative error of the computed |y_j|^2. Terms (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1; valid for any summation order, FMA or not):
    the Gram entry, 2 gamma_d n_i n_j; |y_j|^2 and the subtraction, (sq_err + 1.1 u) n_j^2 + 2.1 u n_i n_j;
    rounding the centred points to the working precision, 2.1 u (n_i + n_j)^2; the float64 reference's own
    rounding, gamma_{d+2}(float64) (n_i + n_j)^2. Then 1% on top (the float64 arithmetic of the bound and
    of the comparisons) and an underflow allowance.
    """
    g, g64 = _gamma(d, u), _gamma(d + 2, _U64)
    main = (2 * g + 2.1 * u) * n_i * n_j + (sq_err + 1.1 * u) * n_j**2 + (2.1 * u + 1.01 * g64) * (n_i + n_j) ** 2
    return 1.01 * main + d * 2.0**-120


def _gram(a: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """``a[rows] @ a.T`` (len(rows), N) in ``a``'s dtype, with true products (no TF32 / bf16 shortcuts)."""
    if a.device.type == "cpu":  # numpy's OpenBLAS: ~2x torch's MKL on the AMD CPUs measured
        full = a.numpy()
        if isinstance(rows, slice) and rows.indices(len(full))[:2] == (0, len(full)):
            return torch.from_numpy(full @ full.T)  # a matrix times its own transpose: BLAS syrk, half the flops
        return torch.from_numpy(full[rows.numpy() if isinstance(rows, torch.Tensor) else rows] @ full.T)
    if a.dtype != torch.float32 or a.device.type != "cuda":
        return a[rows] @ a.T
    matmul = torch.backends.cuda.matmul  # the bound assumes float32 products: switch TF32 off for this call
    new_api = hasattr(matmul, "fp32_precision")
    previous = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "ieee"
        else:
            matmul.allow_tf32 = False
        return a[rows] @ a.T
    finally:
        if new_api:
            matmul.fp32_precision = previous
        else:
            matmul.allow_tf32 = previous


def _centre(x: torch.Tensor, distance: str) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """One layer (N, d) centred and scaled by a power of two: float32 copy, and a function giving a float64 one.

    The float64 copy is needed only where the float32 bound cannot decide. Distances are translation-invariant,
    so any centre works; the mean takes the shared component away. It is kept in ``x``'s dtype, so that for
    float32 ``x`` the float64 copy is exact (a difference of two float32 numbers), its distances exactly those
    of ``x`` times ``scale**2``, and the float32 copy that difference rounded once.
    """
    if distance == "cosine":
        x = torch.nn.functional.normalize(x.double(), dim=-1)
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.float() if x.is_floating_point() else x.double()  # exact for bf16 / fp16 and integers < 2**53
    centre = x.mean(0)  # (d,)
    if x.dtype == torch.float32:
        y = x - centre  # the exact difference, rounded once (exact where it is subnormal)
        scale = _power_of_two_scale(y)
        if scale is not None:  # else the difference overflowed float32: take the float64 route
            return y.mul_(scale), lambda: x.double().sub_(centre.double()).mul_(scale)
    exact = x.double().sub_(centre.double())  # (N, d); a copy even for float64 x (cosine: already one)
    scale = _power_of_two_scale(exact)
    if scale is None:
        raise ValueError("features overflow float64 when centred (|x| near 1e308): divide them by a large constant.")
    exact.mul_(scale)
    return exact.float(), lambda: exact


def _power_of_two_scale(x: torch.Tensor) -> float | None:
    """2**-e bringing max |x| into [0.5, 1), so no square overflows float32 (1.0 for all zeros; None if inf)."""
    low, high = torch.aminmax(x)
    top = max(-low.item(), high.item())
    if not math.isfinite(top):
        return None
    return 2.0 ** -math.frexp(top)[1] if top > 0 else 1.0


def _certify(
    r: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor, k: int, d: int, u: float, sq_err: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of ``r``, and whether the bound proves them the true k nearest.

    Args:
        r: (c, N) computed ``|y_j|^2 - 2 y_i.y_j`` of the rows ``rows``, self entries set to inf.
        rows: (c,) their indices.
        norms: (N,) float64 norms of the centred, scaled points.
        k: Neighbours.
        d: Dimension (the length of each dot product).
        u: Unit roundoff of the arithmetic that made ``r``.
        sq_err: Relative error of the |y_j|^2 in ``r``.

    Returns:
        (c, k) neighbour indices and a (c,) bool tensor, True where the set is proven.

    """
    vals, idx = r.topk(k + 1, dim=-1, largest=False)  # (c, k + 1)
    n_i = norms[rows]  # (c,)
    upper = (vals[:, :k].double() + _bound(n_i[:, None], norms[idx[:, :k]], d, u, sq_err)).amax(-1)  # (c,)
    lower_rest = vals[:, k].double() - _bound(n_i, norms.max(), d, u, sq_err)  # no other point is closer
    return idx[:, :k], upper < lower_rest


def _settle(exact: torch.Tensor, rows: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Exact k nearest of ``rows``: float64 Gram matrix and bound, then direct sums for what stays open.

    Args:
        exact: (N, d) float64 centred, scaled points.
        rows: (m,) the rows to settle.
        k: Neighbours.
        chunk_size: Rows per Gram block.

    Returns:
        (m, k) neighbour indices.

    """
    n, d = exact.shape
    norms = torch.linalg.vector_norm(exact, dim=-1)  # (N,)
    sq = norms.square()  # |x_j|^2: relative error gamma_d of the sum, plus the sqrt and the square
    sq_err = _gamma(d + 3, _U64)
    out = torch.empty(len(rows), k, dtype=torch.long, device=exact.device)
    for start in range(0, len(rows), chunk_size):
        block = rows[start : start + chunk_size]  # (c,)
        r = sq - 2 * _gram(exact, slice(0, n) if len(block) == n else block)  # (c, N) float64; all rows: syrk
        r[torch.arange(len(block), device=r.device), block] = float("inf")  # leave one out
        idx, proven = _certify(r, block, norms, k, d, _U64, sq_err)
        out[start : start + len(block)] = idx
        for i in torch.nonzero(~proven).flatten().tolist():  # exact or 1e-13-close ties: rare
            err = _bound(norms[block[i]], norms, d, _U64, sq_err)  # (N,)
            tau = (r[i] + err).kthvalue(k).values  # the k-th smallest upper bound
            cand = torch.nonzero(r[i] - err <= tau).flatten()  # every point that may be among the k nearest
            dist = ((exact[cand] - exact[block[i]]) ** 2).sum(-1)  # the float64 reference itself
            out[start + i] = cand[dist.argsort(stable=True)[:k]]  # ties: lower index (cand is ascending)
    return out


def loo_neighbours(x: torch.Tensor, k: int, distance: str = "euclidean", chunk_size: int = 2048) -> torch.Tensor:
    """Indices (N, k) of the k nearest other points of every point of one layer (N, d), exactly.

    The set (not its order) is that of the float64 reference; see the module docstring.

    Args:
        x: (N, d) points (float32, float64, bf16, fp16 or integers).
        k: Neighbours (fewer than N).
        distance: ``euclidean``, or ``cosine`` (1 - cosine similarity).
        chunk_size: Query rows per distance block; memory is O(chunk_size * N).

    Returns:
        (N, k) long indices; a point is never its own neighbour.

    """
    y, exact = _centre(x, distance)  # (N, d) float32, and a function giving the float64 copy
    n, d = y.shape
    norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float64)  # (N,)
    if norms.max().item() == 0:  # all points coincide: every distance ties, so the lowest other indices win
        first = torch.arange(k, device=y.device)[None]  # (1, k)
        return first + (first >= torch.arange(n, device=y.device)[:, None]).long()  # skip the point itself
    sq = norms.square().float()  # |y_j|^2: summed in float64, so its only real error is float32's rounding
    out = torch.empty(n, k, dtype=torch.long, device=y.device)
    open_rows = []
    for start in range(0, n if d * _U32 < 0.01 else 0, chunk_size):  # d > 167,000: float32 bounds are void
        stop = min(start + chunk_size, n)
        rows = torch.arange(start, stop, device=y.device)
        # |y_j|^2 - 2 y_i.y_j: the squared distance less |y_i|^2 (constant per row, so the order is the same)
        r = _gram(y, slice(start, stop)).mul_(-2).add_(sq)  # (c, N)
        r.diagonal(offset=start).fill_(float("inf"))  # leave one out: a point never votes for itself
        out[start:stop], proven = _certify(r, rows, norms, k, d, _U32, 1.01 * _U32)
        open_rows.append(rows[~proven])
    open_rows = torch.cat(open_rows) if open_rows else torch.arange(n, device=y.device)
    if len(open_rows):
        out[open_rows] = _settle(exact(), open_rows, k, chunk_size)
    return out
