"""Onsets of each concept's loss drop and CD rise, read from a CD history."""

import pytest

from lcd.callbacks.decodability import write_history
from lcd.emergence import concept_onsets, format_onsets, main, running_median


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


def test_bad_histories_are_refused():
    with pytest.raises(ValueError, match="at least 2 evaluations"):
        concept_onsets(history()[:1])
    with pytest.raises(ValueError, match="positive odd number"):
        concept_onsets(history(), window=4)
    with pytest.raises(ValueError, match=r"layer 2 is not in this CD history; .* layers \[0, 1\]"):
        concept_onsets(history(), layer=2)
    with pytest.raises(ValueError, match="no concept with both probe/loss"):
        concept_onsets([{k: v for k, v in row.items() if "loss" not in k} for row in history()])


def test_command_line_prints_the_table(tmp_path, capsys):
    path = tmp_path / "cd_history.csv"
    write_history(path, history())
    layer, onsets = main([str(path), "--layer", "1"])
    assert capsys.readouterr().out.strip() == format_onsets(layer, onsets)
    assert "+2 evaluations" in format_onsets(layer, onsets) and "no rise" in format_onsets(layer, onsets)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.csv")])
    assert "is not a file" in capsys.readouterr().err
