"""Training throughput of LitPretrain under a real Lightning Trainer vs a plain PyTorch loop.

For each preset the model, data stream, batch, optimizer and lr schedule come from the preset's YAML
through the real ``lcd`` CLI (parse and instantiate only). Both loops start from the same initial
weights, draw the same batches from the same ``SyntheticICLDataModule.train_dataloader()`` and take
the same number of steps; warm-up steps (which absorb ``torch.compile`` when the preset sets
``compile``) are excluded from the timing. The Lightning run has logging,
checkpointing, the progress bar, the model summary and validation off, so the ratio isolates the
Trainer's own per-step cost. Rounds alternate plain/Lightning so a change in machine load hits both;
the median over rounds is reported.

Usage::

    python benchmarks/train_throughput.py                       # CPU preset and paper preset
    python benchmarks/train_throughput.py --presets cpu --rounds 3
    python benchmarks/train_throughput.py --presets paper --accelerator gpu --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class

from lcd.cli import make_cli

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"cpu": "configs/synthetic/cpu.yaml", "paper": "configs/synthetic/paper.yaml"}
DEFAULT_STEPS = {"cpu": (50, 500), "paper": (3, 20)}  # (warm-up, timed) steps on a CPU


@dataclass
class Setup:
    """What both loops share: initial model, data module, optimizer and scheduler configs."""

    model: L.LightningModule
    datamodule: L.LightningDataModule
    optimizer: dict
    lr_scheduler: dict | None


def load_preset(path: str) -> Setup:
    """Instantiate model and data of a preset through the real CLI, without running anything."""
    cli = make_cli(
        ["--config", str(ROOT / path), "--trainer.logger=false", "--trainer.enable_checkpointing=false"], run=False
    )
    config = cli.config
    scheduler = config.get("lr_scheduler")
    return Setup(cli.model, cli.datamodule, config.optimizer.as_dict(), scheduler.as_dict() if scheduler else None)


def build_optim(model: torch.nn.Module, setup: Setup):
    """The preset's optimizer (and lr scheduler, or ``None``) over ``model``'s parameters."""
    optimizer = instantiate_class(model.parameters(), setup.optimizer)
    scheduler = instantiate_class(optimizer, setup.lr_scheduler) if setup.lr_scheduler else None
    return optimizer, scheduler


def plain_loop(setup: Setup, init: dict, warmup: int, steps: int, device: str, bf16: bool) -> float:
    """Sequences per second of a hand-written loop: fetch, forward, MSE, backward, step."""
    model = copy.deepcopy(setup.model).to(device)
    model.load_state_dict(init)
    model.train()
    optimizer, scheduler = build_optim(model, setup)
    setup.datamodule.trainer = None  # a previous Trainer.fit left its trainer: start the stream at batch 0
    batches = iter(setup.datamodule.train_dataloader())
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    batch_size = setup.datamodule.batch_size
    # Compile the forward pass as LitPretrain does when the preset sets ``compile`` (the warm-up steps
    # absorb the compilation in both loops).
    forward = torch.compile(model.net.forward) if model.hparams.get("compile") else model.net
    start = 0.0
    for step in range(warmup + steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with autocast:
            loss = ((forward(batch["xs"], batch["ys"]) - batch["ys"]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step == warmup - 1:
            _sync(device)
            start = time.perf_counter()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


class _Timer(L.Callback):
    """Wall time from the end of the last warm-up step to the end of the last step."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.start, self.end = warmup, device, 0.0, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()
        _sync(self.device)
        self.end = time.perf_counter()


def lightning_loop(
    setup: Setup, init: dict, warmup: int, steps: int, accelerator: str, device: str, precision: str
) -> float:
    """Sequences per second of ``Trainer.fit`` on LitPretrain (training only, no logging or validation)."""
    model = copy.deepcopy(setup.model)
    model.load_state_dict(init)
    optimizer_fn = build_optim  # the same optimizer and schedule as the plain loop
    model.configure_optimizers = lambda: _as_lightning(*optimizer_fn(model, setup))
    timer = _Timer(warmup, device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=setup.datamodule)
    return steps * setup.datamodule.batch_size / (timer.end - timer.start)


def _as_lightning(optimizer, scheduler):
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    """Run the comparison for the chosen presets and print sequences/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/Lightning rounds per preset")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: per preset)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per preset)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, {device}")
    for name in args.presets:
        warmup, steps = DEFAULT_STEPS[name]
        warmup, steps = args.warmup or warmup, args.steps or steps
        setup = load_preset(PRESETS[name])
        init = copy.deepcopy(setup.model.state_dict())
        plain, light = [], []
        for _ in range(args.rounds):
            plain.append(plain_loop(setup, init, warmup, steps, device, args.precision == "bf16-mixed"))
            light.append(lightning_loop(setup, init, warmup, steps, args.accelerator, device, args.precision))
        p, lt = statistics.median(plain), statistics.median(light)
        print(
            f"{name}: batch {setup.datamodule.batch_size}, {warmup} warm-up + {steps} timed steps, "
            f"{args.rounds} rounds | "
            f"plain {p:.0f} seq/s ({p / setup.datamodule.batch_size:.2f} steps/s) | "
            f"lightning {lt:.0f} seq/s ({lt / setup.datamodule.batch_size:.2f} steps/s) | "
            f"ratio lightning/plain {lt / p:.3f} (rounds: plain {[round(x) for x in plain]}, "
            f"lightning {[round(x) for x in light]})",
            flush=True,
        )


if __name__ == "__main__":
    main()
