from types import SimpleNamespace

import torch

from lcd.data import SyntheticICLDataModule
from lcd.tasks import SparseRegressionTask


def datamodule(seed: int = 0) -> SyntheticICLDataModule:
    return SyntheticICLDataModule(
        SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=6), batch_size=4, seed=seed
    )


def take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it)["xs"] for _ in range(n)]


def fake_trainer(step: int = 0, rank: int = 0, world: int = 1):
    return SimpleNamespace(global_step=step, accumulate_grad_batches=1, world_size=world, global_rank=rank)


def test_same_seed_same_batches_and_other_seed_differs():
    a, b, c = (take(datamodule(s).train_dataloader(), 3) for s in (0, 0, 1))
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not a[0].equal(c[0])
    assert not a[0].equal(a[1])


def test_resumed_stream_continues_where_it_stopped():
    full = take(datamodule().train_dataloader(), 5)
    dm = datamodule()
    dm.trainer = fake_trainer(step=3)  # a checkpoint after 3 optimizer steps
    resumed = take(dm.train_dataloader(), 2)
    assert resumed[0].equal(full[3]) and resumed[1].equal(full[4])


def test_ddp_ranks_take_interleaved_batches():
    full = take(datamodule().train_dataloader(), 6)
    shards = []
    for rank in range(2):
        dm = datamodule()
        dm.trainer = fake_trainer(rank=rank, world=2)
        shards.append(take(dm.train_dataloader(), 3))
    assert all(shards[0][i].equal(full[2 * i]) and shards[1][i].equal(full[2 * i + 1]) for i in range(3))


def test_validation_and_probe_sets_are_fixed_balanced_and_distinct():
    dm = datamodule()
    val = list(dm.val_dataloader())
    assert torch.cat([b["xs"] for b in val]).equal(torch.cat([b["xs"] for b in dm.val_dataloader()]))
    counts = torch.bincount(torch.cat([b["concept"] for b in val]), minlength=4)
    assert counts.tolist() == [128] * 4
    probe = list(dm.probe_dataloader(10))
    assert torch.bincount(torch.cat([b["concept"] for b in probe])).tolist() == [10] * 4
    assert not probe[0]["xs"][0].equal(val[0]["xs"][0])
