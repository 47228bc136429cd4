"""Load time of Gemma 3 270M through ``lcd.models.hf.load_causal_lm``, first time and after.

Each load runs in a fresh Python process (as a user's next run would), timed around the call only
(imports excluded). The first load after clearing the cache dequantizes the GGUF and writes the
safetensors copy; later loads read that copy. Target (issue 4): <= 10 s after the first time.

    .venv/bin/python benchmarks/model_load.py            # uses the existing cache if there is one
    .venv/bin/python benchmarks/model_load.py --fresh    # times the first load too (temporary cache)
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="time the first load in an empty temporary cache")
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh:
            env["LCD_CACHE_DIR"] = tmp
            first, n_layers = timed_load(args.model, env)
            print(f"first load (dequantize GGUF + write cache): {first:.1f} s, {n_layers} layers")
        times = [timed_load(args.model, env)[0] for _ in range(args.repeats)]
    print(
        f"{args.model}: later loads {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s"
    )


if __name__ == "__main__":
    main()
