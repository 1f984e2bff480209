#!/usr/bin/env python3
"""Writes models/demo-tissue.onnx, the tissue-class model that ships inside radflow.

The model is a two-layer 3D convolution network with hand-set weights, so it needs no
training data and gives the same bytes every time it is generated:

1. Conv3d 1->1, 3x3x3, after edge padding (the border voxel repeated, so a slab of
   tissue cut by the edge of the scan is not blended with imaginary air): a
   centre-weighted smoothing kernel, the outer product of [1, 2, 1] / 4 along each
   axis (sums to 1, centre weight 8/64).
2. Conv3d 1->4, 1x1x1: one straight line per class, logit_k = b_k + m_k * s, where s is
   the smoothed, CT-window-normalised intensity x = clamp((HU + 1000) / 2000, 0, 1).

With slopes increasing with k, the argmax over the four lines switches from class k to
class k+1 where the two lines cross. The biases put the crossings at HU -400, -50 and
+200, so the label map reads:

    air < -400 HU <= fat < -50 HU <= soft tissue < +200 HU <= bone

Input ``image`` float32 [N, 1, D, H, W] and output ``logits`` float32 [N, 4, D, H, W]
have dynamic N, D, H and W. Labels 0 air, 1 fat, 2 soft_tissue, 3 bone, as listed in
models/models.toml.

Usage: python3 scripts/make_demo_model.py [output path]
It prints the file's SHA-256, which belongs in the model's ``sha256`` line of
models/models.toml.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Class boundaries in HU and the CT window the preset normalises with.
THRESHOLDS_HU = (-400.0, -50.0, 200.0)
WINDOW_LOW_HU, WINDOW_WIDTH_HU = -1000.0, 2000.0
SLOPES = (0.0, 1.0, 2.0, 3.0)
# Multiplies every slope and bias: the crossings stay put, the logits get a readable
# scale (a few units instead of fractions).
SCALE = 10.0


def normalised(hu: float) -> float:
    """A HU value on the model's input scale."""
    return (hu - WINDOW_LOW_HU) / WINDOW_WIDTH_HU


def line_coefficients() -> tuple[np.ndarray, np.ndarray]:
    """Slopes and biases whose consecutive lines cross at the class thresholds.

    Lines k and k+1 are equal where b_k + m_k s = b_{k+1} + m_{k+1} s, so choosing
    b_{k+1} = b_k - t_{k+1} (m_{k+1} - m_k) puts that crossing at s = t_{k+1}.
    """
    thresholds = [normalised(hu) for hu in THRESHOLDS_HU]
    biases = [0.0]
    for k, t in enumerate(thresholds):
        biases.append(biases[k] - t * (SLOPES[k + 1] - SLOPES[k]))
    return (
        np.array(SLOPES, dtype=np.float32) * SCALE,
        np.array(biases, dtype=np.float32) * SCALE,
    )


def build() -> onnx.ModelProto:
    taps = np.array([1.0, 2.0, 1.0], dtype=np.float32) / 4.0
    smooth = np.einsum("i,j,k->ijk", taps, taps, taps).reshape(1, 1, 3, 3, 3)
    slopes, biases = line_coefficients()

    initializers = [
        numpy_helper.from_array(smooth.astype(np.float32), "smooth_w"),
        numpy_helper.from_array(slopes.reshape(4, 1, 1, 1, 1), "classes_w"),
        numpy_helper.from_array(biases, "classes_b"),
        # N, C, D, H, W begins, then ends.
        numpy_helper.from_array(np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Pad", ["image", "pads"], ["padded"], name="edge_pad", mode="edge"),
        helper.make_node(
            "Conv",
            ["padded", "smooth_w"],
            ["smoothed"],
            name="smooth",
            kernel_shape=[3, 3, 3],
        ),
        helper.make_node(
            "Conv",
            ["smoothed", "classes_w", "classes_b"],
            ["logits"],
            name="classes",
            kernel_shape=[1, 1, 1],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_tissue",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, "D", "H", "W"])],
        initializers,
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
    root = Path(__file__).resolve().parent.parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "models" / "demo-tissue.onnx"
    data = build().SerializeToString(deterministic=True)
    out.write_bytes(data)
    slopes, biases = line_coefficients()
    print(f"wrote {out} ({len(data)} bytes)")
    print(f"slopes {slopes.tolist()} biases {biases.tolist()}")
    print(f"thresholds s = {[normalised(h) for h in THRESHOLDS_HU]} (HU {list(THRESHOLDS_HU)})")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
