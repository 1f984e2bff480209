#!/usr/bin/env python3
"""Inferer benchmarks: radflow against Python onnxruntime (+ NumPy), in one run, on the
same machine, model, input and ONNX Runtime thread count.

    python3 bench/inferer.py [--threads 2] [--rounds 8] [--runs 5] [--window-rounds 3] [--work DIR]

1. Per-patch latency of a 96^3 3D U-Net (scripts/make_unet_model.py, 8 base channels,
   3 poolings, 4 classes): `session.run` from Rust (radflow's session code) and from
   Python, in short alternating rounds of `--runs` runs each, after warm-up runs.
2. Whole-volume sliding window on a 300-slice CT at 1.5 mm (`radflow synth`, 512 x 512,
   1.5 mm slices, prepared by `radflow volume --preset demo-tissue --gzip-level 0`, as
   the preprocessor writes it to a folder store: 240 x 240 x 300
   voxels, 36 windows of 96^3 at overlap 0.25): read the volume, window, blend, argmax,
   write the labels; radflow against bench/inferer_reference.py, for the U-Net and the
   demo model, two volumes per process (the first pays for first-touch memory, the
   second is a running service). `session.run` is the floor for both, so the figure
   that matters is the time outside it.
3. The demo model's inferer stage on that CT end to end (job in, labels.nii.gz on the
   512 x 512 x 300 source grid, preview.png, summary.json out), with the volume in
   stored blocks (folder store) and at gzip level 1 (object store).

Prints a Markdown table and writes all measurements to DIR/inferer-results.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python3"
    return str(venv) if venv.exists() else sys.executable


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="alternating patch rounds")
    p.add_argument("--runs", type=int, default=5, help="patch runs per round")
    p.add_argument("--window-rounds", type=int, default=3, help="alternating whole-volume rounds")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "radflow-bench-inferer")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RADFLOW_LOG="warn")

    subprocess.run(
        ["cargo", "build", "--release", "-q", "--bin", "radflow"], check=True, cwd=ROOT
    )
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "radflow-inferer", "--example", "inferer_bench"],
        check=True,
        cwd=ROOT,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    radflow = str(target / "release" / "radflow")
    bench = str(target / "release" / "examples" / "inferer_bench")
    py = python()
    reference = str(ROOT / "bench" / "inferer_reference.py")

    unet = work / "unet96.onnx"
    subprocess.run(
        [py, "scripts/make_unet_model.py", str(unet), "--seed", "7", "--base", "8",
         "--levels", "3", "--classes", "4"],
        check=True, cwd=ROOT, capture_output=True,
    )
    demo = str(ROOT / "models" / "demo-tissue.onnx")
    ct = work / "ct"
    if not (ct / "truth.json").exists():
        subprocess.run(
            [radflow, "synth", "--out", str(ct), "--size", "512", "--slices", "300",
             "--spacing", "1.5", "--fov", "360"],
            check=True, cwd=ROOT, env=env, capture_output=True,
        )
    native = work / "native.nii.gz"
    # As the preprocessor writes it: stored blocks on a folder store (the default
    # there), fastest compression on an object store.
    prepared = work / "input-stored.nii.gz"
    compressed = work / "input-gzip1.nii.gz"
    if not native.exists():
        subprocess.run([radflow, "volume", str(ct), "-o", str(native)], check=True, cwd=ROOT, env=env)
    for path, level in [(prepared, "0"), (compressed, "1")]:
        if not path.exists():
            subprocess.run(
                [radflow, "volume", str(ct), "-o", str(path), "--preset", "demo-tissue",
                 "--gzip-level", level],
                check=True, cwd=ROOT, env=env,
            )
    t = str(args.threads)
    results = {
        "threads": args.threads,
        "load_before": os.getloadavg(),
        "patch": [],
        "window": {},
        "e2e": None,
    }

    # 1. Per-patch latency, alternating sides in short rounds (background load then
    # hits both sides alike).
    common = ["--model", str(unet), "--threads", t, "--runs", str(args.runs), "--warmup", "2"]
    for _ in range(args.rounds):
        results["patch"].append(run_json([bench, "patch", *common]))
        results["patch"].append(run_json([py, reference, "patch", *common]))

    # 2. Whole volume, alternating sides, U-Net and demo model; two volumes per process.
    for name, model in [("unet", str(unet)), ("demo", demo)]:
        runs = []
        for _ in range(args.window_rounds):
            w = ["--model", model, "--volume", str(prepared), "--threads", t, "--repeat", "2"]
            runs.append(run_json([bench, "window", *w, "--out", str(work / "labels-rust.nii.gz")]))
            runs.append(run_json([py, reference, "window", *w, "--out", str(work / "labels-py.nii.gz")]))
        results["window"][name] = runs

    # 3. The demo model's stage end to end, for each way the volume may be stored.
    results["e2e"] = {
        name: run_json(
            [bench, "e2e", "--volume", str(path), "--source", str(native), "--threads", t, "--runs", "3"]
        )
        for name, path in [("stored blocks (folder store)", prepared),
                           ("gzip level 1 (object store)", compressed)]
    }
    results["load_after"] = os.getloadavg()

    (work / "inferer-results.json").write_text(json.dumps(results, indent=1))
    report(results)


def median(values):
    return statistics.median(values)


def report(r: dict) -> None:
    side = lambda rows, s: [x for x in rows if x["side"] == s]  # noqa: E731
    rust = [v for x in side(r["patch"], "radflow") for v in x["runs_ms"]]
    py = [v for x in side(r["patch"], "python") for v in x["runs_ms"]]
    print(f"Load average before and after: {r['load_before']} / {r['load_after']}\n")
    print(f"### Per-patch latency, 96^3 3D U-Net, {r['threads']} threads\n")
    print("| ms | radflow | Python onnxruntime | radflow / Python |")
    print("| --- | ---: | ---: | ---: |")
    for name, f in [("minimum", min), ("median", median), ("mean", statistics.mean)]:
        print(f"| {name} of {len(rust)} runs | {f(rust):.1f} | {f(py):.1f} | {f(rust) / f(py):.3f} |")
    keys = ["total_ms", "session_run_ms", "outside_ms", "read_ms",
            "window_and_argmax_outside_run_ms", "write_ms"]
    for name, rows in r["window"].items():
        a, b = side(rows, "radflow"), side(rows, "python")
        first = a[0]["runs"][0]
        print(f"\n### Whole volume, {name}, {first['shape_dhw']} (D, H, W), {first['windows']} windows\n")
        print("| median over rounds (ms) | radflow, 1st volume | Python, 1st | ratio | radflow, 2nd volume | Python, 2nd | ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for key in keys:
            cells = []
            for k in (0, -1):
                x = median([v["runs"][k][key] for v in a])
                y = median([v["runs"][k][key] for v in b])
                cells += [f"{x:.0f}", f"{y:.0f}", f"{x / y:.2f}"]
            print(f"| {key[:-3]} | " + " | ".join(cells) + " |")
    for volume, e in r["e2e"].items():
        print(f"\n### Demo model, inferer stage end to end, input {e['input_dims']} ({volume}), source {e['source_dims']}\n")
        print("| job | handle (ms) | " + " | ".join(e["timings_ms"][0].keys()) + " |")
        print("| --- | ---: |" + " ---: |" * len(e["timings_ms"][0]))
        for i, (h, t) in enumerate(zip(e["handle_ms"], e["timings_ms"])):
            print(f"| {i + 1} | {h:.0f} | " + " | ".join(f"{v:.0f}" for v in t.values()) + " |")


if __name__ == "__main__":
    main()
