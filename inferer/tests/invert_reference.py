#!/usr/bin/env python3
"""Reference for radflow's linear inversion (`invert_interpolation = "linear"`): the
model's scores become probabilities (softmax over the channels, a sigmoid, or as they
are), each class's probability is interpolated trilinearly at the voxel centres of the
target grid with SciPy's `map_coordinates(order=1, mode="nearest")` (edge values
extend outward), and the label of a voxel is NumPy's argmax there (the first maximum).
Computed in float64, independently of radflow's resampler.

Usage: invert_reference.py DIR

DIR/params.json: {"shape": [C, Z, Y, X], "grid": 4×4 affine of the scores' grid (RAS,
voxel (i, j, k) = (x, y, z)), "target": {"dims": [nx, ny, nz], "affine": 4×4},
"activation": "softmax" | "sigmoid" | "none"}
DIR/scores.f32: the scores, float32 little-endian, C order [C, Z, Y, X].
Writes DIR/activated.f32 ([C, Z, Y, X], the probabilities on the scores' grid),
DIR/probabilities.f32 ([C, nz, ny, nx] on the target grid) and DIR/labels.u8
([nz, ny, nx]).
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates


def activate(scores, activation):
    if activation == "softmax":
        e = np.exp(scores - scores.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    return scores


def invert(params, scores):
    """The reference on `scores` ([C, Z, Y, X]) with `params` as in params.json:
    (probabilities on the scores' grid, probabilities on the target grid, labels)."""
    probabilities = activate(np.asarray(scores, dtype=np.float64), params["activation"])
    source = np.array(params["grid"], dtype=np.float64)
    target = np.array(params["target"]["affine"], dtype=np.float64)
    nx, ny, nz = params["target"]["dims"]
    # Target voxel (i, j, k) → world → continuous voxel index of the scores' grid.
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]).astype(np.float64)
    index = np.linalg.solve(source, target @ ijk)[:3]
    # Array axes are (z, y, x).
    coords = np.stack([index[2], index[1], index[0]])
    moved = np.stack(
        [
            map_coordinates(p, coords, order=1, mode="nearest").reshape(nz, ny, nx)
            for p in probabilities
        ]
    )
    return probabilities, moved, np.argmax(moved, axis=0).astype(np.uint8)


def main(folder):
    folder = Path(folder)
    params = json.loads((folder / "params.json").read_text())
    scores = np.fromfile(folder / "scores.f32", dtype="<f4").reshape(params["shape"])
    probabilities, moved, labels = invert(params, scores)
    probabilities.astype("<f4").tofile(folder / "activated.f32")
    moved.astype("<f4").tofile(folder / "probabilities.f32")
    labels.tofile(folder / "labels.u8")


if __name__ == "__main__":
    main(sys.argv[1])
