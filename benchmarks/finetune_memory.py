"""Step time and peak memory of LoRA (early / late layer group) vs full finetuning, on the CPU.

Model: Gemma 3 270M (18 layers, float32) from lcd's loader; batch: ``--batch`` real 4-shot bitwise
prompts with their answers (the default training batch of configs/finetune/base.yaml), loss = answer-token
NLL exactly as :class:`lcd.lit.finetune.LitFinetune` computes it; optimizer AdamW on the trainable
parameters. Conditions:

- ``lora_early``: LoRA r 16 on every linear module of layers 0-5 (EarlyLayers(fraction=0.333)).
- ``lora_late``:  the same on layers 12-17 (LateLayers(fraction=0.333)).
- ``full``:       every parameter trains (FullFinetune), the memory baseline.

Each condition runs in its own process. Peak memory is the process's peak resident set (VmHWM) over the
training steps only: it is reset (``/proc/self/clear_refs``) after the model is loaded, so it includes
the resident weights but not transient loading buffers. Step time is the median of ``--steps`` steps
after one warm-up step (forward + backward + optimizer step), as wall time and as the process's CPU
time split into forward / backward / optimizer (CPU time is the figure to compare on a shared machine:
wall time also counts waiting for cores other processes hold). Target (issue 5): LoRA peak <= 0.6x full.

    .venv/bin/python benchmarks/finetune_memory.py [--model gemma3-270m] [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONDITIONS = ["lora_early", "lora_late", "full"]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def worker(condition: str, model_name: str, batch_size: int, steps: int, threads: int) -> dict:
    """Load, apply the method, train ``steps + 1`` steps; return the figures."""
    import torch

    from lcd.data.text import encode_prompts
    from lcd.finetuning import FullFinetune, LoRA, count_parameters
    from lcd.layers import EarlyLayers, LateLayers
    from lcd.lit.finetune import LitFinetune
    from lcd.models.hf import CausalLMSpec
    from lcd.tasks import BitwiseTask, make_prompts

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = {
        "lora_early": lambda: LoRA(EarlyLayers(fraction=0.333)),
        "lora_late": lambda: LoRA(LateLayers(fraction=0.333)),
        "full": FullFinetune,
    }[condition]()
    module = LitFinetune(lm=CausalLMSpec(name=model_name), method=method)
    module.train()
    prompts = make_prompts(BitwiseTask(), n_shots=4, n_per_concept=2, split="train", include_null=False)
    batch = encode_prompts(module.tokenizer, prompts[:batch_size], with_answers=True)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    trainable, total = count_parameters(module.model)
    rss_loaded = _rss_mib("VmRSS")
    _reset_peak()
    phases = []  # per step: wall and CPU seconds of forward, backward, optimizer step
    peak_forward = 0.0
    for _ in range(steps + 1):
        marks = [(time.perf_counter(), time.process_time())]
        nll, count = module.answer_nll(batch)
        marks.append((time.perf_counter(), time.process_time()))
        peak_forward = max(peak_forward, _rss_mib("VmRSS"))  # activations saved for backward are live here
        (nll.sum() / count.sum()).backward()
        marks.append((time.perf_counter(), time.process_time()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
        phases.append([(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False)])

    def median(phase: int, clock: int) -> float:
        return round(statistics.median(step[phase][clock] for step in phases[1:]), 3)

    return {
        "condition": condition,
        "description": method.describe(module.model),
        "trainable_params": trainable,
        "total_params": total,
        "batch": list(batch["input_ids"].shape),
        "rss_after_load_mib": round(rss_loaded, 1),
        "rss_after_forward_mib": round(peak_forward, 1),
        "peak_rss_mib": round(_rss_mib("VmHWM"), 1),
        "step_s_median": round(statistics.median(sum(w for w, _ in step) for step in phases[1:]), 3),
        "step_cpu_s_median": round(statistics.median(sum(c for _, c in step) for step in phases[1:]), 3),
        "forward_cpu_s": median(0, 1),
        "backward_cpu_s": median(1, 1),
        "optimizer_cpu_s": median(2, 1),
        "step_s_all": [round(sum(w for w, _ in step), 3) for step in phases],
        "threads": threads,
        "load_average": os.getloadavg()[0],
    }


def table(results: list[dict]) -> str:
    """Markdown table of the figures, ratios against full finetuning."""
    full = next(r for r in results if r["condition"] == "full")
    lines = [
        "| condition | trainable | step wall s | step CPU s (fwd / bwd / opt) | RSS after fwd MiB | peak RSS MiB "
        "| peak / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['condition']} ({r['description']}) | {r['trainable_params'] / 1e6:.2f}M | {r['step_s_median']:.1f} "
            f"| {r['step_cpu_s_median']:.1f} ({r['forward_cpu_s']:.1f} / {r['backward_cpu_s']:.1f} / "
            f"{r['optimizer_cpu_s']:.1f}) | {r['rss_after_forward_mib']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_mib'] / full['peak_rss_mib']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every condition in a fresh process and print/write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/benchmarks/finetune_memory")
    parser.add_argument("--worker", choices=CONDITIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.steps, args.threads)))
        return
    results = []
    for condition in CONDITIONS:
        cmd = [sys.executable, __file__, "--worker", condition, "--model", args.model, "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="offline"))
        if proc.returncode:
            raise RuntimeError(f"{condition} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / "results.md").write_text(md + "\n")
    print(md)
    full = next(r for r in results if r["condition"] == "full")["peak_rss_mib"]
    worst = max(r["peak_rss_mib"] for r in results if r["condition"] != "full")
    print(f"LoRA peak / full peak = {worst / full:.2f} (target <= 0.6): {'PASS' if worst <= 0.6 * full else 'FAIL'}")


if __name__ == "__main__":
    main()
