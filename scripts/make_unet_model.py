#!/usr/bin/env python3
"""Writes a 3D U-Net-shaped ONNX model with random weights drawn from a fixed seed.

radflow's numerical tests and benchmarks need a model with the structure and cost of a
real segmentation network (MONAI's/nnU-Net's 3D U-Net: two 3x3x3 convolutions with
instance normalisation and leaky ReLU per level, 2x2x2 max pooling down, 2x2x2
transposed convolutions up, skip connections by concatenation, a 1x1x1 head), without
trained weights: trained weights are large, licensed, and never stored in the
repository. The same arguments always give the same bytes, so the file can be
generated where it is needed (tests, benchmarks) and its SHA-256 computed there.

Input ``image`` float32 [N, 1, D, H, W] and output ``logits`` float32
[N, classes, D, H, W]; N, D, H and W are dynamic (D, H and W must be multiples of
2^levels). ``--dtype float16`` writes the same network with float16 weights and
tensors throughout (input and output float16 too), for half-precision deployments;
``--layout ndhwc`` takes [N, D, H, W, 1] and gives [N, D, H, W, classes] (channels
last); ``--classifier`` keeps the encoder and ends in global average pooling and a
linear layer: output [N, classes], a whole-volume classification model; ``--batch 4``
fixes N, as some exports do.

Usage: python3 scripts/make_unet_model.py OUT.onnx [--seed 7] [--base 8]
       [--levels 3] [--classes 4] [--dtype float32] [--layout ncdhw] [--classifier]
It prints the file's SHA-256 (for a registry's ``sha256`` line).
"""

import argparse
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, rng: np.random.Generator, dtype: np.dtype):
        self.rng = rng
        self.dtype = dtype
        self.nodes = []
        self.initializers = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int) -> str:
        """Conv3d k^3 with 'same' padding, He-initialised weights, small random bias."""
        fan_in = cin * k**3
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin, k, k, k))
        b = self.rng.normal(0.0, 0.05, cout)
        pad = k // 2
        out = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const("w", w.astype(self.dtype)), self.const("b", b.astype(self.dtype))],
                [out],
                kernel_shape=[k, k, k],
                pads=[pad] * 6,
            )
        )
        return out

    def norm_act(self, x: str, channels: int) -> str:
        """InstanceNormalization with random affine parameters, then LeakyReLU(0.01)."""
        scale = 1.0 + self.rng.normal(0.0, 0.1, channels)
        bias = self.rng.normal(0.0, 0.1, channels)
        normed = self.name("norm")
        self.nodes.append(
            helper.make_node(
                "InstanceNormalization",
                [
                    x,
                    self.const("scale", scale.astype(self.dtype)),
                    self.const("shift", bias.astype(self.dtype)),
                ],
                [normed],
                epsilon=1e-5,
            )
        )
        out = self.name("act")
        self.nodes.append(helper.make_node("LeakyRelu", [normed], [out], alpha=0.01))
        return out

    def block(self, x: str, cin: int, cout: int) -> str:
        x = self.norm_act(self.conv(x, cin, cout, 3), cout)
        return self.norm_act(self.conv(x, cout, cout, 3), cout)

    def down(self, x: str) -> str:
        out = self.name("pool")
        self.nodes.append(
            helper.make_node("MaxPool", [x], [out], kernel_shape=[2, 2, 2], strides=[2, 2, 2])
        )
        return out

    def up(self, x: str, cin: int, cout: int) -> str:
        w = self.rng.normal(0.0, np.sqrt(2.0 / (cin * 8)), (cin, cout, 2, 2, 2))
        b = self.rng.normal(0.0, 0.05, cout)
        out = self.name("up")
        self.nodes.append(
            helper.make_node(
                "ConvTranspose",
                [x, self.const("wt", w.astype(self.dtype)), self.const("bt", b.astype(self.dtype))],
                [out],
                kernel_shape=[2, 2, 2],
                strides=[2, 2, 2],
            )
        )
        return out

    def concat(self, a: str, b: str) -> str:
        out = self.name("cat")
        self.nodes.append(helper.make_node("Concat", [a, b], [out], axis=1))
        return out


def build(
    seed: int,
    base: int,
    levels: int,
    classes: int,
    dtype: str,
    layout: str = "ncdhw",
    classifier: bool = False,
    batch: int = 0,
) -> onnx.ModelProto:
    np_dtype = np.float16 if dtype == "float16" else np.float32
    onnx_dtype = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    b = Builder(np.random.default_rng(seed), np_dtype)
    channels_last = layout == "ndhwc"

    x = "image"
    if channels_last:
        x = b.name("to_ncdhw")
        b.nodes.append(helper.make_node("Transpose", ["image"], [x], perm=[0, 4, 1, 2, 3]))
    widths = [base * 2**i for i in range(levels + 1)]
    skips = []
    cin = 1
    for level in range(levels):
        x = b.block(x, cin, widths[level])
        skips.append(x)
        x = b.down(x)
        cin = widths[level]
    x = b.block(x, cin, widths[levels])
    if classifier:
        pooled = b.name("gap")
        b.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        flat = b.name("flat")
        b.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
        w = b.rng.normal(0.0, np.sqrt(1.0 / widths[levels]), (classes, widths[levels]))
        bias = b.rng.normal(0.0, 0.1, classes)
        b.nodes.append(
            helper.make_node(
                "Gemm",
                [flat, b.const("fc_w", w.astype(np_dtype)), b.const("fc_b", bias.astype(np_dtype))],
                ["logits"],
                transB=1,
            )
        )
        output_shape = ["N", classes]
    else:
        for level in reversed(range(levels)):
            x = b.up(x, widths[level + 1], widths[level])
            x = b.concat(skips[level], x)
            x = b.block(x, 2 * widths[level], widths[level])
        head = b.conv(x, widths[0], classes, 1)
        if channels_last:
            b.nodes.append(
                helper.make_node("Transpose", [head], ["logits"], perm=[0, 2, 3, 4, 1])
            )
            output_shape = ["N", "D", "H", "W", classes]
        else:
            b.nodes.append(helper.make_node("Identity", [head], ["logits"]))
            output_shape = ["N", classes, "D", "H", "W"]
    input_shape = ["N", "D", "H", "W", 1] if channels_last else ["N", 1, "D", "H", "W"]
    if batch > 0:
        input_shape[0] = batch
        output_shape[0] = batch

    graph = helper.make_graph(
        b.nodes,
        "unet3d_classifier" if classifier else "unet3d",
        [helper.make_tensor_value_info("image", onnx_dtype, input_shape)],
        [helper.make_tensor_value_info("logits", onnx_dtype, output_shape)],
        b.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="radflow",
        producer_version="1.0.0",
        opset_imports=[helper.make_opsetid("", 17)],
    )
    # onnx 1.23 writes IR version 14 by default; ONNX Runtime 1.31 reads at most 13.
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--base", type=int, default=8, help="channels of the first level")
    parser.add_argument("--levels", type=int, default=3, help="poolings (resolution levels - 1)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--layout", choices=["ncdhw", "ndhwc"], default="ncdhw")
    parser.add_argument("--classifier", action="store_true", help="encoder + pooling + linear")
    parser.add_argument("--batch", type=int, default=0, help="a fixed batch size (0: dynamic)")
    args = parser.parse_args()
    model = build(
        args.seed,
        args.base,
        args.levels,
        args.classes,
        args.dtype,
        args.layout,
        args.classifier,
        args.batch,
    )
    data = model.SerializeToString(deterministic=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes)")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
