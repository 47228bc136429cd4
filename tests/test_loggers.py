"""lcd.loggers on their own: the CSV logger's one row per step (and its resume), the W&B mode decision."""

import csv

import pytest

from lcd.loggers import CSVLogger, wandb_mode


def rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(logger.experiment.metrics_file_path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_writes_one_row_per_step_once_it_is_complete(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path))
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_metrics({"cd/best": 0.5}, step=1)  # a callback logs at the trainer's step, one ahead
    logger.log_metrics({"train/loss": 0.9}, step=1)
    logger.log_metrics({"val/mse": 2.0}, step=0)  # a late value of step 0, still held
    logger.log_metrics({"train/loss": 0.8}, step=2)  # step 0 is complete now, step 1 not yet
    assert [(r["step"], r["train/loss"], r["val/mse"]) for r in rows(logger)] == [("0", "1.0", "2.0")]
    logger.finalize("success")
    assert [{k: v for k, v in r.items() if v} for r in rows(logger)] == [
        {"step": "0", "train/loss": "1.0", "val/mse": "2.0"},
        {"step": "1", "cd/best": "0.5", "train/loss": "0.9"},
        {"step": "2", "train/loss": "0.8"},
    ]


def test_csv_logger_resumed_from_a_step_continues_the_same_file(tmp_path):
    first = CSVLogger(save_dir=str(tmp_path))
    for step in range(4):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success")
    resumed = CSVLogger(save_dir=str(tmp_path), resume_from_step=2)  # the checkpoint of step 2
    assert resumed.log_dir == first.log_dir
    resumed.log_metrics({"cd/best": 0.25}, step=2)  # completes the row of the checkpoint's step
    resumed.log_metrics({"train/loss": 30.0}, step=3)  # replaces what the interrupted run wrote after it
    resumed.finalize("success")
    assert [(r["step"], r["train/loss"], r["cd/best"]) for r in rows(resumed)] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.0", "0.25"),
        ("3", "30.0", ""),
    ]


def test_wandb_mode_without_credentials_is_offline_without_a_network_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == ("disabled", "WANDB_MODE=disabled")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))

    def reachable(*args, **kwargs):
        raise AssertionError("probed the network without credentials")

    monkeypatch.setattr("lcd.loggers._reachable", reachable)
    assert wandb_mode() == ("offline", "no W&B credentials (run `wandb login` to sync online)")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr("lcd.loggers._reachable", lambda host, timeout=3.0: False)
    mode, reason = wandb_mode()
    assert mode == "offline" and reason.endswith("is unreachable")


@pytest.mark.parametrize("status", ["success", "failed"])
def test_csv_logger_finalize_writes_the_held_rows_whatever_the_status(tmp_path, status):
    logger = CSVLogger(save_dir=str(tmp_path))
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize(status)
    assert [r["step"] for r in rows(logger)] == ["0"]
