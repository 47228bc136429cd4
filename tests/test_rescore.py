"""``python -m lcd.analysis.rescore``: CD of a fitted run's saved checkpoints with other probe settings."""

from __future__ import annotations

import pytest
import torch
from conftest import DEBUG, TINY_SYNTHETIC, config

from lcd.analysis import rescore
from lcd.cli import main as cli_main
from lcd.decodability import linear_probe_accuracy
from lcd.rundir import HISTORY_FILE, load_run, load_weights, read_history


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny synthetic run, paper tokenisation, query-token CD (steps 0 and 4), a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("fitted")
    cli_main([
        "fit", *config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml", "configs/synthetic/y_first.yaml",
                       "callbacks/concept_decodability.yaml", "callbacks/keep_checkpoints.yaml"),
        "--config", DEBUG, *TINY_SYNTHETIC, f"--trainer.default_root_dir={root}",
        "--trainer.callbacks.every_n_train_steps=2",  # the last fragment's callback: keep_checkpoints
    ])  # fmt: skip
    (cfg,) = root.rglob("config.yaml")
    return root, cfg, sorted(root.rglob("*.ckpt"))


def test_scores_every_checkpoint_like_the_callback(fitted, tmp_path):
    root, cfg, ckpts = fitted
    assert [p.name for p in ckpts] == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    assert load_run(cfg, None)[0].net.y_slot == "first"  # configs/synthetic/y_first.yaml reached the model
    out = tmp_path / "post"
    argv = ["--config", str(cfg), "--ckpt", *map(str, ckpts), "--out", str(out)]
    histories = rescore.main(
        [*argv, "--position", "query", "last_y", "--distance", "euclidean", "cosine", "--linear-probe"]
    )
    assert set(histories) == {(p, d) for p in ("query", "last_y") for d in ("euclidean", "cosine")}
    for (position, distance), rows in histories.items():
        assert [row["step"] for row in rows] == [2, 4]  # sorted, last.ckpt scored once
        assert read_history(out / f"cd_history_{position}_{distance}.csv") == rows
        assert (out / "plots" / f"cd_history_{position}_{distance}.png").is_file()
    # The linear probe of each layer read that layer's features at that position (recomputed at step 4).
    model, data = load_run(cfg, None)
    assert load_weights(model, ckpts[-1]) == 4
    for position in ("query", "last_y"):
        features, labels, _ = rescore.probe_features(model.eval(), list(data.probe_dataloader()), [0, 1], position)
        linear = [linear_probe_accuracy(features[i], labels) for i in range(2)]
        assert [histories[position, "cosine"][-1][f"linear/layer_{i:02d}"] for i in range(2)] == linear
    # Same weights, same probe set (the datamodule's, as the callback uses it), same setting: the callback's numbers
    # at the end of fit, key for key.
    (live,) = [row for row in read_history(root / HISTORY_FILE) if row["step"] == 4]
    for key in live:
        assert histories["query", "euclidean"][-1][key] == pytest.approx(live[key], abs=1e-6), key
    # Another position reads other states, so its per-concept loss is equal but its CD rows are its own.
    assert histories["last_y", "euclidean"][-1]["probe/loss/concept_0"] == pytest.approx(
        histories["query", "euclidean"][-1]["probe/loss/concept_0"]
    )


def test_bad_input_fails_before_scoring(fitted, tmp_path, capsys):
    _, cfg, ckpts = fitted
    base = ["--config", str(cfg), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        rescore.main([*base, "--ckpt", str(tmp_path / "missing.ckpt")])
    assert "missing.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rescore.main([*base, "--ckpt", str(ckpts[0]), "--position", "answer"])
    assert "invalid choice: 'answer'" in capsys.readouterr().err  # not a position of lcd.activations.Position
    with pytest.raises(SystemExit):
        rescore.main([*base, "--ckpt", str(ckpts[0]), "--position", "last"])  # a position, but not a synthetic one
    assert "--position last: position must be one of" in capsys.readouterr().err
    alien = tmp_path / "alien.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1}, alien)
    with pytest.raises(SystemExit):
        rescore.main([*base, "--ckpt", str(ckpts[0]), str(alien)])
    assert "alien.ckpt does not fit the model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="layer"):
        rescore.main([*base, "--ckpt", str(ckpts[0]), "--layers", "2"])
    with pytest.raises(SystemExit):  # the run's probe set has 12 prompts per concept
        rescore.main([*base, "--ckpt", str(ckpts[0]), "--k", "12"])
    assert "--k=12 is too large" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.slow  # a fit, then rescoring
def test_preset_with_cd_at_the_last_y_token(tmp_path):
    # `make run`'s fragments (y in every coordinate, CD read at the preset's probe_position, the last y token):
    # the live history is the last-y-token CD of the final weights, as lcd.analysis.rescore scores it.
    cli_main([
        "fit", *config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml",
                       "callbacks/concept_decodability.yaml"),
        "--config", DEBUG, *TINY_SYNTHETIC, f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip
    (cfg,) = tmp_path.rglob("config.yaml")
    model, _ = load_run(cfg, None)
    assert model.net.y_slot == "all"
    argv = ["--config", str(cfg), "--ckpt", str(tmp_path / "checkpoints" / "last.ckpt")]
    argv += ["--out", str(tmp_path / "post")]  # the datamodule's probe set, as the callback used it
    histories = rescore.main([*argv, "--position", "last_y", "query"])
    (live,) = [row for row in read_history(tmp_path / HISTORY_FILE) if row["step"] == 4]
    for key in live:
        assert histories["last_y", "euclidean"][-1][key] == pytest.approx(live[key], abs=1e-6), key
    query = histories["query", "euclidean"][-1]
    assert any(query[k] != pytest.approx(live[k], abs=1e-6) for k in live if k.startswith("cd/layer_")), (
        "query and last-y CD coincide: the position option did not reach the callback"
    )
