#!/usr/bin/env python3
"""The Python side of the inferer benchmarks: onnxruntime + NumPy doing what radflow's
inferer does, the way a Python service would. `bench/inferer.py` runs it against
`inferer_bench` (radflow) on the same model, volume and thread count.

    inferer_reference.py patch  --model M.onnx --threads T --runs N [--warmup W] [--size 96]
    inferer_reference.py window --model M.onnx --volume V.nii.gz --out L.nii.gz --threads T
                                [--roi 96] [--overlap 0.25] [--batch 1] [--repeat 2]

- patch: `session.run` latency of one [1, 1, size^3] patch after warm-up runs;
- window: read the volume with nibabel, MONAI's sliding window with Gaussian blending
  (the NumPy implementation radflow's tests compare against, inferer/tests/
  monai_reference.py), argmax, write the label map with nibabel; the time inside
  `session.run` is measured separately.

Prints one JSON object on stdout.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inferer" / "tests"))
from monai_reference import sliding_window  # noqa: E402


def session(model: str, threads: int) -> ort.InferenceSession:
    """A CPU session with radflow's settings: `threads` intra-op threads, sequential
    execution, and idle threads that do not spin between runs (so the NumPy work
    between runs has the cores, as radflow's blending does)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def patch(args) -> dict:
    s = session(args.model, args.threads)
    n = args.size
    # The same values as radflow's side: ((i * 2654435761) mod 1000) / 1000.
    i = np.arange(n * n * n, dtype=np.uint64)
    x = ((i * np.uint64(2_654_435_761)) % np.uint64(1000)).astype(np.float32) / np.float32(1000)
    x = x.reshape(1, 1, n, n, n)
    times = []
    for k in range(args.warmup + args.runs):
        t = time.perf_counter()
        s.run(None, {"image": x})
        if k >= args.warmup:
            times.append((time.perf_counter() - t) * 1000)
    return {"side": "python", "command": "patch", "size": n, "runs_ms": times}


def window(args) -> dict:
    s = session(args.model, args.threads)
    run_s = [0.0]

    def predictor(batch):
        t = time.perf_counter()
        out = s.run(None, {"image": batch})[0]
        run_s[0] += time.perf_counter() - t
        return out

    # Warm-up, as radflow's session is warmed up when the model loads.
    roi = [args.roi] * 3
    predictor(np.zeros([args.batch, 1] + roi, dtype=np.float32))
    runs = []
    for _ in range(args.repeat):
        run_s[0] = 0.0
        runs.append(window_once(args, roi, predictor, run_s))
    return {"side": "python", "command": "window", "runs": runs}


def window_once(args, roi, predictor, run_s) -> dict:
    import nibabel as nib

    started = time.perf_counter()
    t = time.perf_counter()
    img = nib.load(args.volume)
    # nibabel gives (x, y, z); models take (D, H, W) = (z, y, x).
    data = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0))
    read = time.perf_counter() - t
    t = time.perf_counter()
    logits = sliding_window(data, roi, args.overlap, args.batch, predictor, "constant")
    labels = np.argmax(logits, axis=0).astype(np.uint8)
    del logits
    windowing = time.perf_counter() - t
    t = time.perf_counter()
    out = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), img.affine)
    nib.save(out, args.out)
    write = time.perf_counter() - t
    total = time.perf_counter() - started
    run = run_s[0]
    return {
        "shape_dhw": list(data.shape),
        "total_ms": total * 1000,
        "session_run_ms": run * 1000,
        "outside_ms": (total - run) * 1000,
        "read_ms": read * 1000,
        "window_and_argmax_outside_run_ms": (windowing - run) * 1000,
        "write_ms": write * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["patch", "window"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--volume")
    parser.add_argument("--out")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="volumes per process (window)")
    args = parser.parse_args()
    result = patch(args) if args.command == "patch" else window(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
