"""Masks of the prior, checked against a first-principles enumeration on small grids."""

import numpy as np
import pytest

from dalle_jax.models import masks


def expected_visible(layer_type, text_len, grid_h, grid_w, kernel, q, t):
    """May query position q see key position t? Written from the layout, one pair at a time."""
    side = text_len + 1
    if t > q:
        return False  # nothing sees the future
    if q < side or t < side:
        return True  # text side is causal; image side sees all text
    k, m = q - side, t - side  # image tokens held by query and key
    (rk, ck), (rm, cm) = divmod(k, grid_w), divmod(m, grid_w)
    if layer_type == "dense":
        return True
    if layer_type == "row":
        return k - m <= grid_w
    if layer_type == "column":
        return ck == cm
    r = kernel // 2
    return abs(rk - rm) <= r and abs(ck - cm) <= r


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (3, 5)])
@pytest.mark.parametrize("layer_type", masks.LAYER_TYPES)
@pytest.mark.parametrize("kernel", [3, 5])
def test_masks_match_first_principles(grid, layer_type, kernel):
    text_len = 3
    built = masks.sequence_mask(layer_type, text_len, *grid, conv_kernel=kernel)
    n = grid[0] * grid[1]
    assert built.shape == (text_len + n, text_len + n)
    want = np.array([[expected_visible(layer_type, text_len, *grid, kernel, q, t) for t in range(built.shape[1])]
                     for q in range(built.shape[0])])
    np.testing.assert_array_equal(built, want)


@pytest.mark.parametrize("layer_type", masks.LAYER_TYPES)
def test_image_never_sees_later_image_and_always_sees_text(layer_type):
    text_len, gh, gw = 4, 4, 4
    m = masks.sequence_mask(layer_type, text_len, gh, gw, conv_kernel=3)
    side = text_len + 1
    assert not np.triu(m, 1).any()  # strictly causal everywhere
    assert m[side:, :side].all()  # every image-side query sees start + all text
    assert m.diagonal().all()  # every position sees itself (no empty softmax)


def test_paper_row_example_and_schedule():
    # PAPER.md: "in a 4x4 grid each token sees itself and the previous 4".
    row = masks.image_mask("row", 4, 4)
    assert row[9].sum() == 5 and row[9, 5:10].all()
    sched = masks.layer_schedule(64)
    assert sched[-1] == "conv"
    assert [i + 1 for i, t in enumerate(sched) if t == "column"] == [i for i in range(2, 64, 4)]
    assert masks.layer_schedule(6, "dense") == ("dense",) * 6
    assert masks.layer_schedule(5, last_layer_conv=False)[-1] == "row"


def test_mask_stack_indexes_each_layer():
    stack, index, types = masks.mask_stack(6, 2, 3, 3, conv_kernel=3)
    schedule = masks.layer_schedule(6)
    for i, t in enumerate(schedule):
        np.testing.assert_array_equal(stack[index[i]], masks.sequence_mask(t, 2, 3, 3, conv_kernel=3))
    assert set(types) == set(schedule)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="conv_kernel"):
        masks.image_mask("conv", 4, 4, conv_kernel=4)
    with pytest.raises(ValueError, match="layer type"):
        masks.image_mask("diagonal", 4, 4)
    with pytest.raises(ValueError, match="attention"):
        masks.layer_schedule(4, "strided")
