"""Speed and exactness of leave-one-out 10-NN Concept Decodability: lcd vs scikit-learn, measured in one run.

Data: 1,300 points (13 concepts x 100) x 640 dims x 18 layers of random float32 features with planted
concept structure whose strength rises and falls with depth (so CD spans chance .. ~1).

Timed (same thread count for torch, numpy's BLAS and sklearn's OpenMP, set with threadpoolctl; the methods
take turns, repeat after repeat, so load from other processes hits them alike; wall-clock median and
minimum, and the minimum CPU time of this process, which other processes disturb less):

- lcd: one call of ``lcd.decodability.concept_decodability`` on the (18, 1300, 640) tensor.
- scikit-learn's fastest leave-one-out route, per layer, summed over the 18 layers:
  ``NearestNeighbors(n_neighbors=k).fit(X).kneighbors()`` without X (sklearn then leaves each point out of
  its own neighbours), then the majority vote. Timed on the float32 features and on a float64 copy; the
  faster of the two is the baseline of the ratio.
- scikit-learn, the textbook way: ``cross_val_predict(KNeighborsClassifier(k), cv=LeaveOneOut())`` on ONE
  layer, extrapolated x18 (``--skip-cv`` skips it).

Exactness: lcd's predictions must equal scikit-learn's float64 leave-one-out predictions on every layer
(asserted). ``--agreement`` also scores features with a planted shared offset (1e3, 3e3, 1e4) and three
massive dimensions (0, M or 2M per point, M = 1e3, 1e4), reporting predictions that differ from the
float64 reference for lcd and for the textbook float32 expansion |x_j|^2 - 2 x_i.x_j (lcd's formulation
until issue 18). ``--gemma`` does the same for Gemma 3 270M's residual streams of 105 bitwise prompts
(one forward pass; needs the cached model). ``--alternatives`` times the formulations considered (the float32
expansion; centring plus a float32 or float64 Gram matrix without the certificate; lcd's) and counts their
wrong predictions on an offset and a massive-dimension variant of the data, then times lcd on those variants.

Targets (issue 18): lcd < 1 s, and at least as fast as sklearn's fastest route on the same data.

    .venv/bin/python benchmarks/cd_speed.py --threads 1 [--skip-cv] [--agreement] [--gemma]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from threadpoolctl import threadpool_info, threadpool_limits

from lcd.decodability import concept_decodability, knn_loo_predictions


def make_features(n_layers: int, n_concepts: int, per_concept: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random features (L, N, d) with a concept signal that peaks in the middle layers, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_concepts).repeat_interleave(per_concept)  # (N,)
    centers = torch.randn(n_concepts, dim, generator=g)  # (C, d)
    strength = 0.25 * torch.sin(torch.linspace(0, torch.pi, n_layers))  # (L,): 0 at both ends
    noise = torch.randn(n_layers, len(labels), dim, generator=g)  # (L, N, d)
    return strength[:, None, None] * centers[labels] + noise, labels


def vote(ind: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Majority label of each row of neighbour indices (N, k); ties -> smallest label, as sklearn's predict."""
    classes = np.unique(y)
    votes = (y[ind][:, :, None] == classes).sum(1)  # (N, C)
    return classes[votes.argmax(1)]


def sklearn_loo_predictions(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """LOO k-NN predictions of one layer, sklearn's fastest way: kneighbors() without X excludes each point."""
    ind = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)  # (N, k)
    return vote(ind, y)


def float32_expansion_predictions(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook float32 formulation (lcd's until issue 18), for comparison: |x_j|^2 - 2 x_i.x_j, top-k."""
    x = x.float()  # (L, N, d)
    d = torch.baddbmm((x * x).sum(-1)[:, None, :], x, x.transpose(1, 2), alpha=-2)  # (L, N, N)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    idx = d.topk(k, dim=-1, largest=False).indices  # (L, N, k)
    return torch.from_numpy(np.stack([vote(i, y.numpy()) for i in idx.numpy()]))


def centred_gram_predictions(x: torch.Tensor, y: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An alternative measured for issue 18: centre each layer, numpy Gram matrix (syrk) in ``dtype``, top-k."""
    preds = []
    for layer in x:  # (N, d)
        c = (layer.double() - layer.double().mean(0)).to(dtype).numpy()
        d = torch.from_numpy(c @ c.T).mul_(-2).add_(torch.from_numpy((c * c).sum(1)))  # |c_j|^2 - 2 c_i.c_j
        d.fill_diagonal_(float("inf"))
        preds.append(vote(d.topk(k, dim=-1, largest=False).indices.numpy(), y.numpy()))
    return torch.from_numpy(np.stack(preds))


def alternatives(feats: torch.Tensor, labels: torch.Tensor, k: int, repeats: int) -> None:
    """Time the formulations considered, each on the plain features; count wrong predictions on hard ones."""
    g = torch.Generator().manual_seed(1)
    massive = feats.clone()
    massive[:, :, :3] += 1e4 * torch.randint(0, 3, (feats.shape[1], 1), generator=g)  # 0 / 1e4 / 2e4 per point
    cases = {"offset 1e4": feats + 1e4, "massive 1e4": massive}
    references = {
        name: np.stack([sklearn_loo_predictions(layer, labels.numpy(), k) for layer in x.double().numpy()])
        for name, x in cases.items()
    }
    methods = {
        "float32 expansion (lcd before issue 18)": lambda x: float32_expansion_predictions(x, labels, k),
        "centred, float32 syrk, no certificate": lambda x: centred_gram_predictions(x, labels, k, torch.float32),
        "centred, float64 syrk, no certificate": lambda x: centred_gram_predictions(x, labels, k, torch.float64),
        "lcd: centred, float32 syrk, certified": lambda x: knn_loo_predictions(x, labels, k),
    }
    print(f"\nwrong predictions (of {feats[:, :, 0].numel()}) on the offset and massive-dimension variants:")
    for name, fn in methods.items():
        wrong = ", ".join(f"{case} {int((fn(x).numpy() != references[case]).sum())}" for case, x in cases.items())
        print(f"{name:<42} {wrong}")
    timings = {name: (lambda fn=fn: fn(feats)) for name, fn in methods.items()}
    for case, x in cases.items():
        timings[f"lcd on the {case} variant"] = lambda x=x: knn_loo_predictions(x, labels, k)
    results = interleaved(timings, repeats)
    print_times(results, "lcd: centred, float32 syrk, certified")


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, tuple[list[float], list[float], object]]:
    """Time each function ``repeats`` times, round-robin, so a burst of load from elsewhere hits all alike.

    Returns:
        name -> (wall-clock seconds, CPU seconds of this process, last output).

    """
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outs[name] = fn()
            cpus[name].append(time.process_time() - cpu)
            walls[name].append(time.perf_counter() - wall)
    return {name: (walls[name], cpus[name], outs[name]) for name in fns}


def print_times(results: dict[str, tuple[list[float], list[float], object]], reference: str) -> None:
    ref = statistics.median(results[reference][0])
    print(f"\n{'method':<50} {'median s':>9} {'min s':>8} {'min CPU s':>10} {'runs':>5} {'median / lcd':>13}")
    for name, (walls, cpus, _) in results.items():
        med = statistics.median(walls)
        print(f"{name:<50} {med:9.3f} {min(walls):8.3f} {min(cpus):10.3f} {len(walls):5d} {med / ref:12.2f}x")


def agreement(name: str, feats: torch.Tensor, labels: torch.Tensor, k: int, per_layer: bool = False) -> None:
    """Print how many predictions differ from sklearn's float64 ones: lcd's and the float32 expansion's."""
    x64, y = feats.double().numpy(), labels.numpy()
    reference = np.stack([sklearn_loo_predictions(x64[i], y, k) for i in range(len(x64))])  # (L, N)
    ours = knn_loo_predictions(feats, labels, k).numpy()
    old = float32_expansion_predictions(feats, labels, k).numpy()
    wrong_old = (old != reference).sum(1)  # (L,)
    cd_ref, cd_old = (reference == y).mean(1), (old == y).mean(1)
    worst = int(np.abs(cd_old - cd_ref).argmax())
    print(
        f"{name:<30} lcd differs: {int((ours != reference).sum()):>3}   float32 expansion differs: "
        f"{int(wrong_old.sum()):>5}; worst CD: layer {worst}, {cd_old[worst]:.3f} vs {cd_ref[worst]:.3f} exact"
    )
    if per_layer:
        print("  float32 expansion, differing predictions per layer:", wrong_old.tolist())
        print("  CD per layer (exact = lcd):", " ".join(f"{v:.3f}" for v in cd_ref))
        print("  CD per layer (float32 expansion):", " ".join(f"{v:.3f}" for v in cd_old))
    assert (ours == reference).all(), f"{name}: lcd differs from the float64 reference"


def planted_agreement(feats: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    print(f"\npredictions differing from sklearn's float64 LOO, summed over layers (of {feats[:, :, 0].numel()}):")
    agreement("as generated", feats, labels, k)
    for offset in (1e3, 3e3, 1e4):
        agreement(f"shared offset {offset:g}", feats + offset, labels, k)
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 3, (feats.shape[1], 1), generator=g).float()  # (N, 1): 0, 1 or 2 per point
    for massive in (1e3, 1e4):
        x = feats.clone()
        x[:, :, :3] += massive * groups  # three massive dimensions, 0 / M / 2M per point
        agreement(f"3 massive dims 0/{massive:g}/{2 * massive:g}", x, labels, k)


def gemma_agreement(k: int) -> None:
    from lcd.data.text import ICLTextDataModule
    from lcd.lit.generation import capture_and_generate
    from lcd.models.hf import load_causal_lm
    from lcd.tasks import BitwiseTask

    lm = load_causal_lm("gemma3-270m")
    dm = ICLTextDataModule(BitwiseTask(), eval_shots=[4], n_per_concept=15)
    dm.set_tokenizer(lm.tokenizer)
    (batch,) = dm.loader(dm.eval_prompts(4), batch_size=105)
    feats, _ = capture_and_generate(lm.model, batch["input_ids"], batch["attention_mask"])  # (18, 105, 640)
    print("\nGemma 3 270M, 105 bitwise prompts (4 shots, 7 classes x 15), per layer:")
    agreement("gemma3-270m residual streams", feats, batch["concept"], k, per_layer=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--concepts", type=int, default=13)
    parser.add_argument("--per-concept", type=int, default=100)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each method (interleaved)")
    parser.add_argument("--skip-cv", action="store_true", help="skip the slow cross_val_predict(LeaveOneOut) baseline")
    parser.add_argument("--agreement", action="store_true", help="also score planted offsets and massive dimensions")
    parser.add_argument("--gemma", action="store_true", help="also score Gemma 3 270M's residual streams")
    parser.add_argument("--alternatives", action="store_true", help="also time the formulations issue 18 considered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for torch, BLAS and sklearn's OpenMP alike (0: defaults)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # numpy's and scipy's BLAS, sklearn's OpenMP

    feats, labels = make_features(args.layers, args.concepts, args.per_concept, args.dim, args.seed)
    x32, x64, y_np = feats.numpy(), feats.double().numpy(), labels.numpy()
    n_layers, n, d = feats.shape
    print(f"data: {n_layers} layers x {n} points x {d} dims, {args.concepts} concepts, k={args.k}")
    limits = ", ".join(sorted({f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()}))
    print(f"threads: torch {torch.get_num_threads()}, {limits}; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")

    def sklearn_all(x: np.ndarray) -> np.ndarray:
        return np.stack([sklearn_loo_predictions(layer, y_np, args.k) for layer in x])  # (L, N)

    concept_decodability(feats, labels, args.k)  # warm-ups
    sklearn_all(x32[:1])
    lcd_name, sk32_name, sk64_name = (
        "lcd concept_decodability, all layers",
        "sklearn NearestNeighbors.kneighbors(), float32",
        "sklearn NearestNeighbors.kneighbors(), float64",
    )
    results = interleaved(
        {
            lcd_name: lambda: concept_decodability(feats, labels, args.k),
            sk32_name: lambda: sklearn_all(x32),
            sk64_name: lambda: sklearn_all(x64),
        },
        args.repeats,
    )
    lcd_times, pred32, pred64 = results[lcd_name][0], results[sk32_name][2], results[sk64_name][2]

    ours = knn_loo_predictions(feats, labels, args.k).numpy()
    mismatch = (ours != pred64).sum(1)
    assert not mismatch.any(), f"lcd differs from sklearn's float64 predictions: {mismatch.tolist()} per layer"
    print(
        f"predictions: lcd = sklearn float64 on all {n_layers * n}; "
        f"sklearn on the float32 copy differs on {(pred32 != pred64).sum()}"
    )
    print("CD per layer:", " ".join(f"{v:.3f}" for v in results[lcd_name][2].double().numpy()))

    if not args.skip_cv:
        mid = n_layers // 2
        wall, cpu = time.perf_counter(), time.process_time()
        cv_pred = cross_val_predict(KNeighborsClassifier(args.k), x64[mid], y_np, cv=LeaveOneOut())
        cv = ([(time.perf_counter() - wall) * n_layers], [(time.process_time() - cpu) * n_layers], None)
        assert (cv_pred == ours[mid]).all(), f"layer {mid}: cross_val_predict and lcd differ"
        results[f"sklearn cross_val_predict LOO (layer {mid} x{n_layers})"] = cv
    print_times(results, lcd_name)

    lcd_med, lcd_min = statistics.median(lcd_times), min(lcd_times)
    sk_times = min(results[sk32_name][0], results[sk64_name][0], key=statistics.median)  # sklearn's faster route
    ratio_med, ratio_min = statistics.median(sk_times) / lcd_med, min(sk_times) / lcd_min
    print(
        f"\nlcd: {lcd_med:.3f} s median, {lcd_min:.3f} s min (target < 1 s: {'PASS' if lcd_med < 1 else 'FAIL'}); "
        f"sklearn's fastest route / lcd: {ratio_med:.2f}x median, {ratio_min:.2f}x min "
        f"(target >= 1x: {'PASS' if ratio_med >= 1 else 'FAIL'})"
    )
    if args.agreement:
        planted_agreement(feats, labels, args.k)
    if args.alternatives:
        alternatives(feats, labels, args.k, args.repeats)
    if args.gemma:
        gemma_agreement(args.k)


if __name__ == "__main__":
    main()
