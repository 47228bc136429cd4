"""Prepare the real models for the slow tests, in a process of its own (started by conftest.py).

    python tests/prefetch_models.py OUT_DIR

Runs the Gemma probe (``conftest.GEMMA_PROBE``) through ``lcd validate`` into ``OUT_DIR/gemma_probe``, saving the
features and labels it computed CD from to ``OUT_DIR/gemma_probe.pt``; loads SmolLM2-135M once, so that its
dequantized copy is in the lcd cache; writes ``OUT_DIR/done`` last. The first load of each model in a fresh
cache dequantizes its GGUF (one to three minutes for Gemma).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import GEMMA_PROBE


def main(out: Path) -> None:
    from lcd.cli import main as lcd
    from lcd.lit import probe
    from lcd.models.hf import load_causal_lm

    seen = []
    real_cd = probe.concept_decodability

    def concept_decodability(features, labels, *args, **kwargs):
        seen.append((features, labels))
        return real_cd(features, labels, *args, **kwargs)

    probe.concept_decodability = concept_decodability  # what the probe computes CD from
    lcd([*GEMMA_PROBE, f"--trainer.default_root_dir={out / 'gemma_probe'}"])
    ((features, labels),) = seen  # one shot count: one CD computation over all layers
    torch.save({"features": features, "labels": labels}, out / "gemma_probe.pt")
    load_causal_lm("smollm2-135m")
    (out / "done").write_text("done\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
