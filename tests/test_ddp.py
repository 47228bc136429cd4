"""Concept Decodability under DDP (2 CPU processes, gloo) equals one process on the same probe set."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEBUG, ROOT, TINY_SYNTHETIC, config

from lcd.cli import main
from lcd.decodability import ConceptDecodabilityMetric
from lcd.rundir import read_history

pytestmark = pytest.mark.slow


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(30)
    return torch.randn(3, 120, 8, generator=g) + labels[None, :, None] * 0.3, labels  # (L, N, d)


def _worker(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    features, labels = _data()
    metric = ConceptDecodabilityMetric()
    for start in range(rank * 10, 120, 20):  # uneven interleaved shards of the same pooled set
        metric.update(features[:, start : start + 10], labels[start : start + 10])
    result = metric.compute()
    out[rank] = result["cd"].tolist()
    dist.destroy_process_group()


def test_metric_under_ddp_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="fork")  # no second start-up of torch
    features, labels = _data()
    single = ConceptDecodabilityMetric()
    single.update(features, labels)
    expected = single.compute()["cd"].tolist()
    assert out[0] == pytest.approx(expected) and out[1] == pytest.approx(expected)
    assert 0.3 < expected[0] < 1.0  # a non-trivial value, so agreement means something


def test_callback_under_ddp_equals_one_process(tmp_path):
    args = [*config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml", "callbacks/concept_decodability.yaml"),
            "--config", DEBUG, *TINY_SYNTHETIC, "--trainer.max_steps=2",
            "--data.init_args.eval_batch_size=10"]  # fmt: skip
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'single'}"])  # the reference, in this process
    # DDP needs its own command: Lightning starts rank 1 by running the command line of rank 0 again.
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run([sys.executable, "-m", "lcd", "fit", *args, *ddp], env=dict(os.environ, WANDB_MODE="offline"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_history(tmp_path / "single" / "cd_history.csv")[0]
    ddp = read_history(tmp_path / "ddp" / "cd_history.csv")[0]
    assert single["step"] == ddp["step"] == 0
    cd_keys = [k for k in single if k.startswith("cd/")]
    assert len(cd_keys) > 10
    for key in cd_keys + [k for k in single if k.startswith("probe/loss")]:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
