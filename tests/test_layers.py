import pytest

from lcd.layers import AllLayers, EarlyLayers, LateLayers, LayerList, LayerRange, select_layers


@pytest.mark.parametrize(
    ("group", "n_layers", "expected"),
    [
        (EarlyLayers(count=1), 4, [0]),  # layer 0 alone: must not be dropped as falsy
        (EarlyLayers(count=2), 4, [0, 1]),
        (EarlyLayers(fraction=0.333), 18, [0, 1, 2, 3, 4, 5]),  # first third of Gemma 3 270M
        (EarlyLayers(fraction=10 / 32), 32, list(range(10))),  # the paper's first 10 of Llama-3.1-8B
        (EarlyLayers(fraction=0.01), 4, [0]),  # rounds up to one block
        (LateLayers(count=1), 4, [3]),
        (LateLayers(fraction=0.333), 18, [12, 13, 14, 15, 16, 17]),
        (LateLayers(fraction=10 / 32), 32, list(range(22, 32))),
        (LayerRange(0, 1), 3, [0]),
        (LayerRange(1, 3), 4, [1, 2]),
        (LayerRange(-2), 4, [2, 3]),
        (LayerRange(0, None), 2, [0, 1]),
        (LayerList([0]), 2, [0]),
        (LayerList([3, 0, -1]), 4, [0, 3]),
        (AllLayers(), 3, [0, 1, 2]),
    ],
)
def test_resolve(group, n_layers, expected):
    assert group.resolve(n_layers) == expected


def test_one_group_fits_any_depth():
    early, late = EarlyLayers(fraction=0.5), LateLayers(fraction=0.5)
    for n in (2, 4, 18, 32):
        assert early.resolve(n) + late.resolve(n) == list(range(n))


@pytest.mark.parametrize(
    ("group", "n_layers", "message"),
    [
        (EarlyLayers(count=5), 4, "exceeds the model's 4 layers"),
        (LateLayers(count=5), 4, "exceeds the model's 4 layers"),
        (LayerRange(2, 2), 4, "selects no layer"),
        (LayerRange(3, 1), 4, "selects no layer"),
        (LayerRange(0, 9), 4, "stop=9 is out of range"),
        (LayerList([4]), 4, r"layer 4 is out of range for a model with 4 layers: use 0..3"),
        (LayerList([-5]), 4, "out of range"),
        (LayerList([]), 4, "selects no layer"),
        (AllLayers(), 0, "no decoder blocks"),
    ],
)
def test_bad_selection_fails_clearly(group, n_layers, message):
    with pytest.raises(ValueError, match=message):
        group.resolve(n_layers)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EarlyLayers(),
        lambda: EarlyLayers(count=2, fraction=0.5),
        lambda: EarlyLayers(count=0),
        lambda: LateLayers(fraction=0.0),
        lambda: LateLayers(fraction=1.5),
    ],
)
def test_bad_arguments_fail_at_construction(make):
    with pytest.raises(ValueError, match="count|fraction"):
        make()


def test_describe():
    assert EarlyLayers(fraction=0.333).describe(18) == "layers 0-5 of 18"
    assert LayerList([0, 2]).describe(4) == "layers 0,2 of 4"
    assert LateLayers(count=1).describe(4) == "layers 3 of 4"


def test_select_layers_takes_every_form_of_the_one_vocabulary():
    assert select_layers(None, 4) == [0, 1, 2, 3]
    assert select_layers([-1, 0], 4) == [0, 3]
    assert select_layers(0, 4) == [0]
    assert select_layers(LateLayers(count=2), 4) == [2, 3]  # a strategy, as finetuning takes it
    with pytest.raises(ValueError, match="out of range for a model with 4 layers"):
        select_layers([4], 4)
    with pytest.raises(ValueError, match="selects no layer"):
        select_layers([], 4)
