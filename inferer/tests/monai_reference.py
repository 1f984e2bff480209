#!/usr/bin/env python3
"""Reference for radflow's sliding window: MONAI 1.x `sliding_window_inference` with
mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0, written in NumPy
(float32 like MONAI's default compute dtype) so the Rust tests need neither MONAI nor
torch. It follows MONAI's steps literally (pad list in F.pad order, the "first d with
d*interval + roi >= size" window count, meshgrid("ij") window order, the importance map
built with arange and a 1e-3 floor) rather than radflow's closed forms, so the two
implementations check each other.

Usage: monai_reference.py DIR

DIR/params.json: {"mode": "fake" | "onnx" | "run", "shape": [D, H, W], "roi": [..],
"overlap": f, "batch_size": n, "model": path (onnx, run), "fake": {...} (fake),
"dtype": "float32" | "float16" (the model's tensors; default float32)}
DIR/image.f32: the image, float32 little-endian, C order.
"sliding window" modes write DIR/output.f32 ([C, D, H, W]); "run" runs the model once on
DIR/image.f32 as one batch of the shape given (any rank, e.g. [N, 1, D, H, W] or
channels-last [N, D, H, W, 1]) and writes its output as float32.
DIR/output.json holds the output shape.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np


def scan_interval(image_size, roi_size, overlap):
    out = []
    for size, roi in zip(image_size, roi_size):
        if roi == size:
            out.append(int(roi))
        else:
            interval = int(roi * (1 - overlap))
            out.append(interval if interval > 0 else 1)
    return out


def window_starts(image_size, roi_size, interval):
    starts = []
    for size, roi, step in zip(image_size, roi_size, interval):
        num = int(math.ceil(float(size) / step))
        count = next((d for d in range(num) if d * step + roi >= size), None)
        count = count + 1 if count is not None else 1
        dim_starts = []
        for i in range(count):
            start = i * step
            start -= max(start + roi - size, 0)
            dim_starts.append(start)
        starts.append(dim_starts)
    grid = np.meshgrid(*starts, indexing="ij")
    return np.asarray([g.flatten() for g in grid]).T


def importance_map(roi_size, sigma_scale=0.125):
    weights = None
    for i, roi in enumerate(roi_size):
        sigma = roi * sigma_scale
        x = np.arange(-(roi - 1) / 2.0, (roi - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
        weights = g if i == 0 else weights[..., None] * g[(None,) * i]
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def sliding_window(image, roi_size, overlap, batch_size, predictor, padding="constant"):
    """image: [D, H, W] float32; returns [C, D, H, W]. padding: constant (zeros) or edge
    (MONAI's padding_mode="replicate")."""
    image_size_ = list(image.shape)
    image_size = [max(s, r) for s, r in zip(image_size_, roi_size)]
    # F.pad order: last dimension first, (before, after) pairs.
    pad_size = []
    for k in range(2, -1, -1):
        diff = max(roi_size[k] - image_size_[k], 0)
        half = diff // 2
        pad_size.extend([half, diff - half])
    pads = [(pad_size[2 * (2 - k)], pad_size[2 * (2 - k) + 1]) for k in range(3)]
    if padding == "edge":
        padded = np.pad(image, pads, mode="edge").astype(np.float32)
    else:
        padded = np.pad(image, pads, mode="constant", constant_values=0.0).astype(np.float32)

    interval = scan_interval(image_size, roi_size, overlap)
    starts = window_starts(image_size, roi_size, interval)
    weights = importance_map(roi_size)

    output = None
    count = np.zeros(image_size, dtype=np.float32)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        windows = [tuple(slice(s, s + r) for s, r in zip(start, roi_size)) for start in chunk]
        batch = np.stack([padded[w][None] for w in windows]).astype(np.float32)
        logits = np.asarray(predictor(batch), dtype=np.float32)
        if output is None:
            output = np.zeros([logits.shape[1]] + image_size, dtype=np.float32)
            for start in starts:
                w = tuple(slice(s, s + r) for s, r in zip(start, roi_size))
                count[w] += weights
        for b, w in enumerate(windows):
            output[(slice(None),) + w] += weights[None] * logits[b]
    output /= count[None]

    crop = []
    for sp in range(3):
        si = 2 - sp
        crop.insert(0, slice(pad_size[sp * 2], pad_size[sp * 2] + image_size_[si]))
    return output[(slice(None),) + tuple(crop)]


def fake_predictor(params):
    """Per channel c: a_c*x + b_c + k_c*(z + 2y + 3x)/(D + 2H + 3W) + g_c*mean(patch)."""
    a, b, k, g = (np.asarray(params[n], dtype=np.float64) for n in ("a", "b", "k", "g"))

    def run(batch):
        n, _, d, h, w = batch.shape
        z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
        pos = ((z + 2 * y + 3 * x) / float(d + 2 * h + 3 * w)).astype(np.float32)
        out = np.empty((n, len(a), d, h, w), dtype=np.float32)
        for i in range(n):
            patch = batch[i, 0]
            mean = np.float32(patch.astype(np.float64).mean())
            for c in range(len(a)):
                out[i, c] = (
                    np.float32(a[c]) * patch
                    + np.float32(b[c])
                    + np.float32(k[c]) * pos
                    + np.float32(g[c]) * mean
                )
        return out

    return run


def onnx_predictor(model, dtype="float32"):
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.astype(dtype)})[0].astype(np.float32)


def main():
    folder = Path(sys.argv[1])
    params = json.loads((folder / "params.json").read_text())
    image = np.fromfile(folder / "image.f32", dtype="<f4").reshape(params["shape"])
    dtype = params.get("dtype", "float32")
    if params["mode"] == "run":
        out = onnx_predictor(params["model"], dtype)(image)
    else:
        if params["mode"] == "fake":
            predictor = fake_predictor(params["fake"])
        else:
            predictor = onnx_predictor(params["model"], dtype)
        out = sliding_window(
            image,
            params["roi"],
            params["overlap"],
            params["batch_size"],
            predictor,
            params.get("padding", "constant"),
        )
    out = np.ascontiguousarray(out, dtype="<f4")
    out.tofile(folder / "output.f32")
    (folder / "output.json").write_text(json.dumps({"shape": list(out.shape)}))


if __name__ == "__main__":
    main()
