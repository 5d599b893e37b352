"""An independent float64 NumPy forward pass of EfficientNet-Lite0, to check the ONNX build.

Written from the architecture description, not from ``xintu.model._build``: its own
block table, its own convolution with explicit TensorFlow "SAME" padding, and
BatchNorm applied unfolded after each convolution. Only the weights are shared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

EPS = 1e-3
# One row per block: (kernel, stride, expansion, output channels).
BLOCKS: list[tuple[int, int, int, int]] = (
    [(3, 1, 1, 16)]
    + [(3, 2, 6, 24), (3, 1, 6, 24)]
    + [(5, 2, 6, 40), (5, 1, 6, 40)]
    + [(3, 2, 6, 80)]
    + [(3, 1, 6, 80)] * 2
    + [(5, 1, 6, 112)] * 3
    + [(5, 2, 6, 192)]
    + [(5, 1, 6, 192)] * 3
    + [(3, 1, 6, 320)]
)


def same_pad(x: Array, kernel: int, stride: int) -> Array:
    """Zero-pad H and W as TF "SAME" does: output ceil(in / stride), extra pixel after."""
    pads = []
    for size in x.shape[2:]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), (0, 0), *pads])


def conv(x: Array, w: Array, stride: int, *, depthwise: bool = False) -> Array:
    """2-D convolution, NCHW, weights OIHW (depthwise: C1HW), SAME padding, no bias."""
    k = w.shape[2]
    xp = same_pad(x, k, stride)
    n, _, h, wd = x.shape
    ho, wo = math.ceil(h / stride), math.ceil(wd / stride)
    out = np.zeros((n, w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            if depthwise:
                out += patch * w[None, :, 0, i, j, None, None]
            else:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j], optimize=True)
    return out


def batch_norm(x: Array, p: Mapping[str, Array], prefix: str) -> Array:
    def v(name: str) -> Array:
        return p[f"{prefix}.{name}"][None, :, None, None]

    return (x - v("running_mean")) / np.sqrt(v("running_var") + EPS) * v("weight") + v("bias")


def relu6(x: Array) -> Array:
    return np.minimum(np.maximum(x, 0.0), 6.0)


def forward(weights: Mapping[str, npt.NDArray[Any]], x: npt.NDArray[Any]) -> Array:
    """Logits ``[N, 1000]`` for a normalised NCHW batch *x*, computed in float64."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    h = np.asarray(x, dtype=np.float64)
    h = relu6(batch_norm(conv(h, p["_conv_stem.weight"], 2), p, "_bn0"))
    for i, (_kernel, stride, expansion, c_out) in enumerate(BLOCKS):
        b = f"_blocks.{i}"
        inp = h
        if expansion != 1:
            h = relu6(batch_norm(conv(h, p[f"{b}._expand_conv.weight"], 1), p, f"{b}._bn0"))
        h = conv(h, p[f"{b}._depthwise_conv.weight"], stride, depthwise=True)
        h = relu6(batch_norm(h, p, f"{b}._bn1"))
        h = batch_norm(conv(h, p[f"{b}._project_conv.weight"], 1), p, f"{b}._bn2")
        if stride == 1 and inp.shape[1] == c_out:
            h = h + inp
    h = relu6(batch_norm(conv(h, p["_conv_head.weight"], 1), p, "_bn1"))
    pooled = h.mean(axis=(2, 3))
    logits: Array = pooled @ p["_fc.weight"].T + p["_fc.bias"]
    return logits
