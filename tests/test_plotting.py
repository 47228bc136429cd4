"""lcd.plotting on its own: each figure draws the numbers it is given (read back from the matplotlib artists)."""

import numpy as np
import pytest
import torch

from lcd.plotting import plot_cd_heatmap, plot_cd_history, plot_cd_per_layer, plot_snapshot, save_png

HISTORY = [
    {"step": 0.0, "cd/layer_00": 0.25, "cd/layer_02": 0.30, "probe/loss/concept_0": 2.0, "probe/loss/concept_1": 1.0},
    {"step": 50.0, "cd/layer_00": 0.40, "cd/layer_02": 0.90, "probe/loss/concept_0": 0.5, "probe/loss/concept_1": 0.8},
]


def test_cd_history_and_heatmap_draw_every_layer_against_step():
    fig = plot_cd_history(HISTORY, [0, 2])
    top, bottom = fig.axes[:2]
    assert [(line.get_label(), list(line.get_ydata())) for line in top.get_lines()] == [
        ("concept 0", [2.0, 0.5]),
        ("concept 1", [1.0, 0.8]),
    ]
    assert [(line.get_label(), list(line.get_ydata())) for line in bottom.get_lines()] == [
        ("layer 0", [0.25, 0.40]),
        ("layer 2", [0.30, 0.90]),
    ]
    assert all(list(line.get_xdata()) == [0.0, 50.0] for line in bottom.get_lines())
    heatmap = plot_cd_heatmap(HISTORY, [0, 2])
    np.testing.assert_array_equal(heatmap.axes[0].images[0].get_array(), [[0.25, 0.40], [0.30, 0.90]])  # layer x step
    assert [t.get_text() for t in heatmap.axes[0].get_yticklabels()] == ["0", "2"]


def test_snapshot_shows_the_two_principal_components():
    # Points in a 2-D plane of 6-D space: the top-2 PCA projection keeps every pairwise distance.
    g = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(6, 2, generator=g)).Q.T  # (2, 6) orthonormal rows
    coords = torch.randn(12, 2, generator=g) * torch.tensor([3.0, 1.0])
    labels = torch.arange(3).repeat_interleave(4)
    fig = plot_snapshot(coords @ plane + 5.0, labels, "pca", layer=1, step=7)
    ax = fig.axes[0]
    drawn = torch.tensor(np.concatenate([c.get_offsets() for c in ax.collections]), dtype=torch.float)
    assert [c.get_label() for c in ax.collections] == ["concept 0", "concept 1", "concept 2"]
    torch.testing.assert_close(torch.cdist(drawn, drawn), torch.cdist(coords, coords), atol=1e-4, rtol=1e-4)
    assert ax.get_title() == "layer 1, step 7 (PCA)"


def test_cd_per_layer_marks_each_shot_counts_best_layer_and_chance(tmp_path):
    results = {
        1: {"layers": [0, 1, 2], "cd": torch.tensor([0.2, 0.5, 0.3]), "best_layer": 1},
        4: {"layers": [0, 1, 2], "cd": torch.tensor([0.3, 0.4, 0.8]), "best_layer": 2},
    }
    fig = plot_cd_per_layer(results, chance=1 / 7)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["1-shot"].get_ydata()) == pytest.approx([0.2, 0.5, 0.3])
    stars = [line for line in fig.axes[0].get_lines() if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [
        ([1], [pytest.approx(0.5)]),
        ([2], [pytest.approx(0.8)]),
    ]
    assert list(lines["chance"].get_ydata()) == [pytest.approx(1 / 7)] * 2
    path = save_png(fig, tmp_path / "plots" / "cd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
