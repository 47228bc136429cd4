"""Onsets of each concept's loss drop and CD rise, read from a CD history."""

import pytest

from lcd.analysis.onsets import (
    BEATS_LASSO,
    DecodingCurve,
    concept_onsets,
    fitted_window,
    format_onsets,
    main,
    merge_by_step,
    running_median,
)
from lcd.rundir import write_history


def history(spike_at: int | None = None) -> list[dict[str, float]]:
    """20 evaluations every 100 steps, 2 layers, 2 concepts.

    Concept 0: loss drops at evaluation 5, its layer-1 CD rises at evaluation 7. Concept 1: loss drops at
    evaluation 12, its CD stays at chance with small wiggles (and one spike at ``spike_at``).
    """
    rows = []
    for i in range(20):
        cd1 = 0.25 + (0.03 if i % 2 else -0.03)
        if i == spike_at:
            cd1 = 0.9
        row = {"step": 100.0 * i, "cd/best_layer": 1.0, "cd/best": 0.5}
        row |= {"probe/loss/concept_0": 1.0 if i < 5 else 0.2, "probe/loss/concept_1": 1.0 if i < 12 else 0.3}
        row |= {"cd/layer_00/concept_0": 0.25, "cd/layer_00/concept_1": 0.25}
        row |= {"cd/layer_01/concept_0": 0.25 if i < 7 else 0.9, "cd/layer_01/concept_1": cd1}
        rows.append(row)
    return rows


def test_onsets_of_a_planted_history():
    layer, (c0, c1) = concept_onsets(history())
    assert layer == 1  # the last row's best layer
    assert (c0.loss_step, c0.cd_step, c0.lag) == (500, 700, 2)
    assert c0.cd_start == pytest.approx(0.25) and c0.cd_end == pytest.approx(0.9)
    assert (c0.loss_start, c0.loss_end) == (pytest.approx(1.0), pytest.approx(0.2))
    assert c1.loss_step == 1200 and c1.cd_step is None and c1.lag is None
    layer0, onsets0 = concept_onsets(history(), layer=0)
    assert layer0 == 0 and all(o.cd_step is None for o in onsets0)
    # A concept without CD at the layer (absent from the probe set) is left out, not a KeyError.
    rows = [{k: v for k, v in row.items() if k != "cd/layer_01/concept_1"} for row in history()]
    assert [o.concept for o in concept_onsets(rows)[1]] == [0]


def test_the_running_median_ignores_a_single_spike():
    _, (_, smoothed) = concept_onsets(history(spike_at=3))
    assert smoothed.cd_step is None
    _, (_, raw) = concept_onsets(history(spike_at=3), window=1)
    assert raw.cd_step == 300 and raw.lag == 3 - 12
    assert running_median([1, 5, 2, 8, 3], 3) == [3, 2, 5, 3, 5.5]


def test_a_short_history_is_not_flattened_by_the_window():
    # A finetuning run's three evaluations: a median over all three would make both curves flat.
    rows = [history()[i] | {"step": float(step)} for i, step in ((0, 0), (7, 250), (19, 300))]
    _, (c0, _) = concept_onsets(rows)  # default window 5: shrunk to 1 for three evaluations
    assert (c0.loss_start, c0.loss_end, c0.loss_step) == (1.0, 0.2, 250)
    assert (c0.cd_start, c0.cd_end, c0.cd_step) == (0.25, 0.9, 250)
    assert [fitted_window(5, n) for n in (3, 5, 6, 9, 10, 20)] == [1, 1, 3, 3, 5, 5]


def test_bad_histories_are_refused():
    with pytest.raises(ValueError, match="at least 2 evaluations"):
        concept_onsets(history()[:1])
    with pytest.raises(ValueError, match="positive odd number"):
        concept_onsets(history(), window=4)
    with pytest.raises(ValueError, match=r"layer 2 is not in this CD history; .* layers \[0, 1\]"):
        concept_onsets(history(), layer=2)
    with pytest.raises(ValueError, match="no concept has both a decoding curve probe/loss"):
        concept_onsets([{k: v for k, v in row.items() if "loss" not in k} for row in history()])


def test_command_line_prints_the_table(tmp_path, capsys):
    path = tmp_path / "cd_history.csv"
    write_history(path, history())
    layer, onsets = main([str(path), "--layer", "1"])
    assert capsys.readouterr().out.strip() == format_onsets(layer, onsets)
    assert "+2 evaluations" in format_onsets(layer, onsets) and "no rise" in format_onsets(layer, onsets)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.csv")])
    assert "not a file" in capsys.readouterr().err


def metrics(first_steps: range, beats_at: int) -> list[dict[str, float]]:
    """Lightning-style sparse metrics rows: a training row every 50 steps, a validation row every 400.

    Concept 0's tail error falls below LASSO's (error 0.5) at step ``beats_at``; concept 1's never does.
    """
    rows: list[dict[str, float]] = []
    for step in first_steps:
        rows.append({"step": float(step), "train/loss": 1.0})
        if step % 400 == 399:
            rows.append(
                {
                    "step": float(step),
                    "val/mse_tail/concept_0": 0.4 if step >= beats_at else 0.8,
                    "val/mse_tail/concept_1": 0.7,
                    "val/ref/lasso/mse_tail/concept_0": 0.5,
                    "val/ref/lasso/mse_tail/concept_1": 0.5,
                }
            )
    return rows


def test_decoding_read_from_a_resumed_runs_metrics_beats_lasso():
    # A run stopped after step 1199 and resumed in a second metrics file; concept 0 beats LASSO from 799.
    rows = merge_by_step([metrics(range(49, 1200, 50), beats_at=799), metrics(range(1199, 2000, 50), beats_at=799)])
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # one row per step
    val = [r for r in rows if "val/mse_tail/concept_0" in r]
    assert len(val) == 5 and all("train/loss" in r for r in val)  # train and val rows of a step merged
    layer, (c0, c1) = concept_onsets(history(), layer=1, window=1, decoding_rows=rows, curve=BEATS_LASSO)
    # CD of concept 0 rises half way at step 700: one CD evaluation (100 steps) before 799.
    assert (c0.loss_step, c0.cd_step, c0.lag) == (799, 700, -1)
    assert (c0.loss_start, c0.loss_end) == (pytest.approx(1.6), pytest.approx(0.8))
    assert c1.loss_step is None and c1.lag is None and c1.loss_end == pytest.approx(1.4)
    table = format_onsets(layer, [c0, c1], BEATS_LASSO)
    assert "never" in table and "val/mse_tail/concept_<k> / val/ref/lasso/mse_tail/concept_<k>" in table
    # The same rows read as half of the drop of the raw tail error, with no reference: still step 799.
    half = concept_onsets(history(), 1, 1, 0.15, val, DecodingCurve("val/mse_tail/concept_{k}"))[1][0]
    assert half.loss_step == 799
    with pytest.raises(ValueError, match="need {k}"):
        DecodingCurve("val/mse_tail/concept_0")


def test_command_line_reads_decoding_from_metrics_files(tmp_path, capsys):
    path, first, second = tmp_path / "cd_history.csv", tmp_path / "m0.csv", tmp_path / "m1.csv"
    write_history(path, history())
    write_history(first, metrics(range(49, 1200, 50), beats_at=1599))
    write_history(second, metrics(range(1199, 2000, 50), beats_at=1599))
    layer, (c0, _) = main([str(path), "--layer", "1", "--window", "1", "--decoding", str(first), str(second)])
    assert c0.loss_step == 1599 and c0.lag == 7 - 16
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "1" and last[4] == "never" and last[-3:] == ["no", "rise", "-"]  # concept 1's row
    # Only the first file: concept 0 never beats LASSO before step 1199.
    _, (c0, _) = main([str(path), "--layer", "1", "--window", "1", "--decoding", str(first)])
    assert c0.loss_step is None
    # --below alone changes only the threshold: the curve is still the tail error over LASSO's (0.8 / 0.5).
    below = [str(path), "--layer", "1", "--window", "1", "--decoding", str(first), "--below"]
    assert main([*below, "1.7"])[1][0].loss_step == 399
    assert main([*below, "1.5"])[1][0].loss_step is None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(path), "--decoding", str(tmp_path / "missing.csv")])
    assert "not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), "--decoding", str(first), "--decoding-key", "val/mse_tail"])
    assert "need {k}" in capsys.readouterr().err
