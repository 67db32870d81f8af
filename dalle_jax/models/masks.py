"""Attention masks of the DALL·E prior, built once as numpy data and shared by every attention implementation.

Sequence layout (length L = T + N for T text tokens and an h x w grid of N image tokens):

    position  0          1 .. T               T+1 .. T+N-1
    holds     <start>    text t_0 .. t_{T-1}   image i_0 .. i_{N-2}
    predicts  t_0        t_1 .. i_0            i_1 .. i_{N-1}

so the last text position predicts the first image token and the last image token is only ever a target
(L = 256 + 1024 = 1280 at the paper's sizes). Positions 0..T are the "text side", T+1.. the "image side";
the image-side position p holds image token k = p - T - 1 at grid cell (k // w, k % w).

`mask[q, t]` is True when query position q may attend to key position t. One joint softmax per query:
- text side -> text side: causal (t <= q); text side never sees the image side (it is all in the future).
- image side -> text side: always, in every layer (the start token and every text position).
- image side -> image side, by layer type, for the query holding k and the key holding m (always m <= k):
    dense   every m <= k
    row     k - w <= m <= k: itself and the previous image-row's worth of tokens
    column  m == k (mod w): the same column, in this and earlier rows
    conv    |row(m) - row(k)| <= r and |col(m) - col(k)| <= r, r = kernel // 2: the causal part of a
            kernel x kernel neighbourhood centred on k (the paper's 11 x 11 at 32 x 32)

Image-side block for a 3 x 3 grid (query rows k = 0..7 hold i_0..i_7, key columns m likewise; i_8 is only a
target; every image-side query also sees the whole text side), as printed by `render`::

    row          column       conv (kernel 3)
    1.......     1.......     1.......
    11......     .1......     11......
    111.....     ..1.....     .11.....
    1111....     1..1....     11.1....
    .1111...     .1..1...     11111...
    ..1111..     ..1..1..     .11.11..
    ...1111.     1..1..1.     ...11.1.
    ....1111     .1..1..1     ...11111

Layer schedule (1-based layer i of n, the paper's): the last layer is `conv`; otherwise `column` when
(i - 2) % 4 == 0, else `row`. `attention="dense"` makes every layer dense (the sparse-vs-dense ablation);
`last_layer_conv=False` replaces the final conv layer by the schedule's row/column (the conv ablation);
`attention="row"|"column"|"conv"` uses that one type everywhere (tests, further ablations).
"""

from __future__ import annotations

import numpy as np

LAYER_TYPES = ("dense", "row", "column", "conv")


def layer_schedule(n_layers: int, attention: str = "sparse", last_layer_conv: bool = True) -> tuple[str, ...]:
    """The mask type of each layer, in order."""
    if attention not in ("sparse", *LAYER_TYPES):
        raise ValueError(f"attention='{attention}': choose 'sparse' (the paper's schedule) or one type for every "
                         f"layer: {LAYER_TYPES}")
    if attention != "sparse":
        return (attention,) * n_layers
    types = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
    if last_layer_conv and n_layers:
        types[-1] = "conv"
    return tuple(types)


def image_mask(layer_type: str, grid_h: int, grid_w: int, conv_kernel: int = 11) -> np.ndarray:
    """(N, N) bool over image tokens: may the position holding token k see the one holding m?"""
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"unknown layer type '{layer_type}'; choose one of {LAYER_TYPES}")
    if conv_kernel < 1 or conv_kernel % 2 != 1:
        raise ValueError(f"conv_kernel={conv_kernel} must be a positive odd number")
    n = grid_h * grid_w
    k = np.arange(n)[:, None]
    m = np.arange(n)[None, :]
    causal = m <= k
    if layer_type == "dense":
        return causal
    if layer_type == "row":
        return causal & (m >= k - grid_w)
    if layer_type == "column":
        return causal & (m % grid_w == k % grid_w)
    radius = conv_kernel // 2
    near = (np.abs(m // grid_w - k // grid_w) <= radius) & (np.abs(m % grid_w - k % grid_w) <= radius)
    return causal & near


def sequence_mask(layer_type: str, text_len: int, grid_h: int, grid_w: int, conv_kernel: int = 11) -> np.ndarray:
    """(L, L) bool for the whole sequence, L = text_len + grid_h * grid_w (layout in the module docstring)."""
    n = grid_h * grid_w
    side = text_len + 1  # start token + text
    length = text_len + n
    mask = np.zeros((length, length), bool)
    mask[:side, :side] = np.tril(np.ones((side, side), bool))
    mask[side:, :side] = True
    # Image-side positions hold tokens 0..N-2; token N-1 is only a target.
    mask[side:, side:] = image_mask(layer_type, grid_h, grid_w, conv_kernel)[: n - 1, : n - 1]
    return mask


def mask_stack(n_layers: int, text_len: int, grid_h: int, grid_w: int, *, attention: str = "sparse",
               last_layer_conv: bool = True, conv_kernel: int = 11) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The distinct masks the schedule uses, stacked, and each layer's index into the stack.

    Returns (masks (M, L, L) bool, layer_index (n_layers,) int32, types (M,) names): the transformer scans
    over layers with `masks[layer_index[i]]`, so the per-layer choice is data, not a Python branch.
    """
    schedule = layer_schedule(n_layers, attention, last_layer_conv)
    types = tuple(t for t in LAYER_TYPES if t in schedule)
    masks = np.stack([sequence_mask(t, text_len, grid_h, grid_w, conv_kernel) for t in types])
    layer_index = np.array([types.index(t) for t in schedule], np.int32)
    return masks, layer_index, types


def render(mask: np.ndarray) -> str:
    """A mask as rows of '1' and '.', for docstrings, `dalle-jax info` and debugging."""
    return "\n".join("".join("1" if v else "." for v in row) for row in mask)
