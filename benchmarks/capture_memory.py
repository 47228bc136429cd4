"""Peak CPU memory of residual-stream capture vs a plain forward vs ``output_hidden_states=True``.

A 200-token batch of 8 through a Gemma 3 270M-sized causal LM (18 layers, d_model 640, vocabulary 262,144):
the real dequantized copy that ``lcd.models.hf.load_causal_lm("gemma3-270m")`` keeps in its cache when
present, else the same architecture from a ``Gemma3TextConfig`` with random weights (nothing downloads).
Variants, all under ``torch.no_grad()`` with ``use_cache=False``:

- ``plain``: ``model(input_ids, attention_mask)``;
- ``capture``: the same inside ``lcd.activations.capture_residual`` of every layer at the last token;
- ``hidden_states``: the same with ``output_hidden_states=True``.

Each is measured with full-vocabulary logits (``logits_to_keep=0``: 8 x 200 x 262,144 floats, 1.6 GiB, which
dominate) and with ``logits_to_keep=1`` (the activation cost becomes visible). Every (variant, logits) pair
runs in its own fresh subprocess: model built, one warm-up forward of the same kind, then the baseline RSS
is read, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and a thread samples
``/proc/self/statm`` at ~1 kHz during each measured forward. Reported: peak RSS increase over the
baseline (kernel mark; the sampled peak beside it), median over all measured forwards.

The workers run with ``MALLOC_MMAP_THRESHOLD_=65536``: by default glibc raises its mmap threshold up to
32 MiB and keeps freed blocks below it in the heap, so after the warm-up the activations of the next
forward (tensors of 3-13 MiB here) reuse retained pages and RSS does not move at all (+0.0 MiB measured).
With a fixed small threshold every sizeable tensor is mmapped and returned when freed, so the RSS peak
follows the live tensor bytes. ``--mmap-threshold 0`` shows glibc's steady state instead.

Target (issue 3): capture peak <= 1.2x the plain forward's, with ``output_hidden_states=True`` beside it.

    .venv/bin/python benchmarks/capture_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MARK = "@@RESULT "
VARIANTS = ["plain", "capture", "hidden_states"]
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20

# Gemma 3 270M (the config.json of google/gemma-3-270m, as in lcd's dequantized cache)
GEMMA3_270M = dict(
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    max_position_embeddings=32_768,
)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm() -> int | None:
    """The kernel's peak-RSS mark (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples RSS every ``interval`` seconds until stopped; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss())
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss())


def cached_real_model() -> bool:
    try:
        from lcd.models.hf import cache_root, load_causal_lm  # noqa: F401
    except ImportError:
        return False
    return (cache_root() / "models" / "gemma3-270m" / "model.safetensors").exists()


def build_model(kind: str):
    import torch

    if kind == "gemma3-270m":
        from lcd.models.hf import load_causal_lm

        return load_causal_lm("gemma3-270m").model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M)).eval()


def worker(args: argparse.Namespace) -> None:
    """Measure one (variant, logits_to_keep) pair in this fresh process; print a JSON result line."""
    import torch

    from lcd.activations import capture_residual, last_token_positions, n_decoder_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    pos = last_token_positions(mask)  # (B,)
    n_layers = n_decoder_layers(model)
    kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=args.logits_to_keep)

    def forward():
        with torch.no_grad():
            if args.worker == "plain":
                return model(**kwargs), None
            if args.worker == "hidden_states":
                return model(**kwargs, output_hidden_states=True), None
            with capture_residual(model, layers=None, positions=pos) as cap:
                out = model(**kwargs)
            return out, cap

    out, cap = forward()  # warm-up: lazy init, allocator pools
    if cap is not None:
        assert cap.stacked().shape == (n_layers, args.batch, cfg.hidden_size)
    del out, cap
    gc.collect()

    peaks, sampled, times, n_samples = [], [], [], []
    for _ in range(args.inner):
        gc.collect()
        base = rss()
        kernel = reset_hwm()
        sampler = Sampler()
        sampler.start()
        start = time.perf_counter()
        out, cap = forward()
        times.append(time.perf_counter() - start)
        sampler.stop()
        peak = hwm() if kernel else None
        peaks.append(((peak if peak is not None else sampler.peak) - base) / MIB)
        sampled.append((sampler.peak - base) / MIB)
        n_samples.append(sampler.samples)
        del out, cap
    result = {
        "variant": args.worker,
        "logits_to_keep": args.logits_to_keep,
        "peak_mib": peaks,
        "sampled_mib": sampled,
        "seconds": times,
        "samples": n_samples,
        "kernel_mark": kernel,
        "n_layers": n_layers,
        "d_model": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "threads": torch.get_num_threads(),
    }
    print(MARK + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace, variant: str, logits_to_keep: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--logits-to-keep", str(logits_to_keep)]
    cmd += ["--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens)]
    cmd += ["--inner", str(args.inner), "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    raise RuntimeError(f"worker {variant} (logits_to_keep={logits_to_keep}) failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=["auto", "gemma3-270m", "random"],
        default="auto",
        help="auto: the cached real Gemma 3 270M if lcd has it, else random weights of the same shape",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per (variant, logits) pair")
    parser.add_argument("--inner", type=int, default=2, help="measured forwards per process, after the warm-up")
    parser.add_argument("--logits", choices=["both", "full", "last"], default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ of the workers, so freed tensors leave RSS (0: glibc's default, which "
        "keeps the warm-up's freed activations in the heap and hides every peak below ~32 MiB per tensor)",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--logits-to-keep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.model == "auto":
        args.model = "gemma3-270m" if cached_real_model() else "random"

    heads = {"both": [0, 1], "full": [0], "last": [1]}[args.logits]
    results: dict[tuple[str, int], list[dict]] = {(v, h): [] for h in heads for v in VARIANTS}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for h in heads:
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                res = run_worker(args, v, h)
                results[(v, h)].append(res)
                loads.append(os.getloadavg()[0])
                print(f"  {v:>13} logits_to_keep={h}: peak +{statistics.median(res['peak_mib']):.1f} MiB", flush=True)

    info = next(iter(results.values()))[0]
    b, t, n_layers, d, vocab = args.batch, args.tokens, info["n_layers"], info["d_model"], info["vocab"]
    print(
        f"\nmodel: {args.model} ({n_layers} layers, d_model {d}, vocab {vocab}, float32); batch {b} x {t} tokens; "
        f"torch threads {info['threads']}; MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold or 'glibc default'}; "
        f"load avg {min(loads):.1f}-{max(loads):.1f}"
    )
    print(
        f"for scale: logits {b * t * vocab * 4 / MIB:.0f} MiB; all hidden_states ({n_layers + 1} x B x T x d) "
        f"{(n_layers + 1) * b * t * d * 4 / MIB:.1f} MiB; captured (L x B x d) {n_layers * b * d * 4 / MIB:.2f} MiB"
    )
    mark = "kernel VmHWM" if info["kernel_mark"] else "sampled"
    header = f"{'variant':<15} {'logits':<12} {'peak +MiB':>10} {'sampled':>9} {'x plain':>8} {'fwd s':>6}"
    print(f"\n{header}  all ({mark})")
    ratios = {}
    for h in heads:
        plain = statistics.median(p for res in results[("plain", h)] for p in res["peak_mib"])
        for v in VARIANTS:
            runs = results[(v, h)]
            peak = statistics.median(p for res in runs for p in res["peak_mib"])
            samp = statistics.median(p for res in runs for p in res["sampled_mib"])
            secs = statistics.median(s for res in runs for s in res["seconds"])
            ratios[(v, h)] = peak / plain if plain > 0 else float("nan")
            every = ", ".join(f"{p:.1f}" for res in runs for p in res["peak_mib"])
            label = "all (full)" if h == 0 else f"last {h}"
            print(f"{v:<15} {label:<12} {peak:10.1f} {samp:9.1f} {ratios[(v, h)]:8.2f} {secs:6.1f}  [{every}]")
    print()
    for h in heads:
        label = "full logits" if h == 0 else f"logits_to_keep={h}"
        cap, hid = ratios[("capture", h)], ratios[("hidden_states", h)]
        verdict = "PASS" if cap <= 1.2 else "FAIL"
        print(f"{label}: capture/plain {cap:.2f} (target <= 1.2: {verdict}); hidden_states/plain {hid:.2f}")


if __name__ == "__main__":
    main()
