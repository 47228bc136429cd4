"""Load time of a preset through ``lcd.models.hf.load_causal_lm``: the first load (cold) and later ones (warm).

Each load runs in a fresh Python process (as a user's next run would), timed around the call only (imports
excluded). The cold load runs in an empty temporary cache: it dequantizes the GGUF and writes the safetensors
copy; the warm loads read that copy. Target (issue 4): warm <= 10 s. (The test suite checks that a later load
reads the copy and not the GGUF, tests/test_hf_models.py; the times are measured here only.)

    .venv/bin/python benchmarks/model_load.py                # cold, then warm x3, and their ratio
    .venv/bin/python benchmarks/model_load.py --cached       # warm only, in the user's cache
    .venv/bin/python benchmarks/model_load.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import time
from lcd.models.hf import load_causal_lm
t = time.perf_counter()
lm = load_causal_lm({name!r})
print(f"{{time.perf_counter() - t:.3f}} {{lm.n_layers}}")
"""


def timed_load(name: str, env: dict[str, str]) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(name=name)], env=env, capture_output=True, text=True, check=True
    )
    seconds, n_layers = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(n_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--repeats", type=int, default=3, help="warm loads (median reported)")
    parser.add_argument("--cached", action="store_true", help="skip the cold load; time warm loads in the user cache")
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        cold = None
        if not args.cached:
            env["LCD_CACHE_DIR"] = tmp
            cold, n_layers = timed_load(args.model, env)
            print(f"{args.model}: cold load (dequantize the GGUF, write the cache): {cold:.1f} s, {n_layers} layers")
        warm = [timed_load(args.model, env)[0] for _ in range(args.repeats)]
    median = statistics.median(warm)
    print(f"{args.model}: warm loads {', '.join(f'{t:.2f}' for t in warm)} s; median {median:.2f} s")
    if cold is not None:
        print(f"{args.model}: cold / warm = {cold / median:.1f}x")


if __name__ == "__main__":
    main()
