"""Training curricula and the warm-up/cosine lr schedule: exact, seeded, resumable, stepped per step."""

from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG, TINY_SYNTHETIC, config

from lcd.cli import make_cli
from lcd.data import SyntheticICLDataModule
from lcd.data.stream import batch_generator
from lcd.schedules import WarmupCosineLR
from lcd.tasks import SparseRegressionTask
from lcd.tasks.synthetic.curriculum import ActiveDimsCurriculum, ConceptCurriculum
from lcd.tasks.synthetic.sparse_regression import FunctionMixtureTask

TASK = SparseRegressionTask(n_dims=8, n_concepts=4, rank=2, n_pairs=6)


def batch(curriculum, index: int, size: int = 256) -> dict[str, torch.Tensor]:
    return curriculum.sample(TASK, size, batch_generator(0, 0, index), index)


def plain(index: int, size: int = 256) -> dict[str, torch.Tensor]:
    return TASK.sample(size, batch_generator(0, 0, index))


def test_concept_curriculum_introduces_concepts_one_at_a_time():
    cur = ConceptCurriculum(batches_per_concept=10)
    assert set(batch(cur, 0)["concept"].tolist()) == {0}
    assert set(batch(cur, 9)["concept"].tolist()) == {0}
    assert set(batch(cur, 10)["concept"].tolist()) == {0, 1}
    assert set(batch(cur, 25)["concept"].tolist()) == {0, 1, 2}
    b = batch(cur, 0)
    assert (b["xs"] * (1 - b["mask"])[:, None, :]).abs().sum() > 0  # x itself is not touched
    for index in (30, 31, 500):  # all concepts in: the very stream of the full task
        assert all(batch(cur, index)[k].equal(plain(index)[k]) for k in ("xs", "ys", "concept"))


def test_active_dims_curriculum_silences_then_fades_in_the_dims_outside_the_basis():
    cur = ActiveDimsCurriculum(hold_batches=10, ramp_batches=20)
    assert [cur.scale(i) for i in (0, 10, 20, 30, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    for index, scale in ((3, 0.0), (20, 0.5)):
        b, ref = batch(cur, index), plain(index)
        inside, outside = b["mask"].bool()[:, None, :].expand_as(b["xs"]), ~b["mask"].bool()[:, None, :]
        outside = outside.expand_as(b["xs"])
        assert b["xs"][inside].equal(ref["xs"][inside])
        assert torch.allclose(b["xs"][outside], scale * ref["xs"][outside])
        assert b["ys"].equal(ref["ys"]) and b["concept"].equal(ref["concept"])
        # the labels stay exact: w is zero outside the basis, so y is the same function of the scaled x
        x = b["xs"][0][:, b["mask"][0].bool()]  # (n, r): the basis dims only
        w = torch.linalg.lstsq(x, b["ys"][0][:, None]).solution
        assert torch.allclose(x @ w, b["ys"][0][:, None], atol=0.5)  # noise std 0.1
    assert set(batch(cur, 0)["concept"].tolist()) == {0, 1, 2, 3}
    assert all(batch(cur, 30)[k].equal(plain(30)[k]) for k in ("xs", "ys", "concept"))


def test_curricula_reject_bad_settings():
    with pytest.raises(ValueError, match="batches_per_concept"):
        ConceptCurriculum(0)
    with pytest.raises(ValueError, match="ramp_batches"):
        ActiveDimsCurriculum(hold_batches=5, ramp_batches=0)
    with pytest.raises(ValueError, match="mask"):
        ActiveDimsCurriculum().sample(FunctionMixtureTask(n_dims=4, n_pairs=3), 2, batch_generator(0, 0, 0), 0)


def test_curriculum_stream_is_seeded_and_resumes_where_it_stopped():
    def datamodule() -> SyntheticICLDataModule:
        return SyntheticICLDataModule(TASK, batch_size=8, curriculum=ActiveDimsCurriculum(2, 4))

    it = iter(datamodule().train_dataloader())
    full = [next(it)["xs"] for _ in range(8)]
    assert full[0].equal(batch(ActiveDimsCurriculum(2, 4), 0, 8)["xs"])
    dm = datamodule()
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=1, world_size=1, global_rank=0)
    it = iter(dm.train_dataloader())
    assert next(it)["xs"].equal(full[5]) and next(it)["xs"].equal(full[6])


def test_warmup_cosine_factors():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    assert lrs[9] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert lrs[14:] == pytest.approx([0.2] * 6)  # floor after total_steps, no error
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(opt, warmup_steps=10, total_steps=10)


def test_cli_lr_scheduler_steps_every_optimizer_step(run_dir):
    # The training stream is infinite (an epoch never ends): the schedule must advance per step.
    cli = make_cli(
        [
            "fit",
            *config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml"),
            "--config",
            DEBUG,
            *TINY_SYNTHETIC,
            f"--trainer.default_root_dir={run_dir}",
            "--lr_scheduler=lcd.schedules.WarmupCosineLR",
            "--lr_scheduler.warmup_steps=10",
            "--lr_scheduler.total_steps=100",
        ]
    )
    assert cli.trainer.global_step == 4
    base = cli.config.fit.optimizer.init_args.lr
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(base * 5 / 10)
