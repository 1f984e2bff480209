#!/usr/bin/env python3
"""Preprocessor speed and memory: a 300-slice 512x512 CT series (radflow's phantom,
1 mm slices), uncompressed, JPEG Lossless SV1 (DCMTK dcmcjpeg +e1), High-Throughput JPEG
2000 lossless (OpenJPH's ojph_compress, through preprocessor/tests/reference.py) and
lossy 12-bit JPEG Extended (dcmcjpeg +ee), taken through read + decode + build +
resample to 1.5 mm + CT window + write .nii.gz by:

- radflow:     radflow volume SERIES -o OUT.nii.gz --preset demo-tissue
- SimpleITK:   ImageSeriesReader + ResampleImageFilter + Clamp + WriteImage
- dicom2nifti: dicom_series_to_nifti, then nibabel's resample_to_output + clip + save

(see bench/preprocessor_tools.py). Every tool runs as its own process under
/usr/bin/time -v (wall time and maximum resident set size), interleaved round by round
on the same files with a warm page cache; the table gives the median of the rounds.
radflow's output is compared voxel by voxel (in HU) with SimpleITK's; SimpleITK (GDCM)
does not read 12-bit JPEG Extended, so there the speed reference is dicom2nifti, and
radflow's output is compared with SimpleITK's on the same files decompressed by DCMTK's
dcmdjpeg (IJG's 12-bit decoder).

Usage: python3 bench/preprocessor.py [--radflow target/release/radflow] [--runs 3]
                                     [--keep DIR]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "preprocessor_tools.py")
REFERENCE = os.path.join(HERE, "..", "preprocessor", "tests", "reference.py")


def timed(cmd):
    """Runs cmd under /usr/bin/time -v; returns (wall seconds, peak RSS in MiB)."""
    out = subprocess.run(
        ["/usr/bin/time", "-v"] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", out.stderr).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return seconds, rss_kb / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radflow", default="target/release/radflow")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="folder for the series and outputs (kept)")
    args = ap.parse_args()
    python = sys.executable
    work = args.keep or tempfile.mkdtemp(prefix="radflow-bench-pre-")
    os.makedirs(work, exist_ok=True)

    plain = os.path.join(work, "ct")
    lossless = os.path.join(work, "ct-jpeg-lossless")
    extended = os.path.join(work, "ct-jpeg-extended")
    htj2k = os.path.join(work, "ct-htj2k")
    if not os.path.isdir(plain):
        subprocess.run(
            [args.radflow, "synth", "--out", plain, "--slices", "300", "--size", "512",
             "--spacing", "1.0", "--seed", "4"],
            check=True, stdout=subprocess.DEVNULL,
        )
        os.remove(os.path.join(plain, "truth.json"))
    extended_ijg = os.path.join(work, "ct-jpeg-extended-dcmdjpeg")
    for tool, option, source, folder in [
        ("dcmcjpeg", "+e1", plain, lossless),
        ("dcmcjpeg", "+ee", plain, extended),
        ("dcmdjpeg", "+te", extended, extended_ijg),
    ]:
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for name in sorted(os.listdir(source)):
                subprocess.run(
                    [f"/usr/bin/{tool}", option, os.path.join(source, name),
                     os.path.join(folder, name)],
                    check=True,
                )

    if not os.path.isdir(htj2k):
        subprocess.run([python, REFERENCE, "encode_htj2k", plain, htj2k], check=True)

    def size_mb(d):
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1e6

    tools = {
        "radflow": lambda src, out: [args.radflow, "volume", src, "-o", out, "--preset", "demo-tissue"],
        "SimpleITK": lambda src, out: [python, TOOLS, "sitk", src, out],
        "dicom2nifti": lambda src, out: [python, TOOLS, "dicom2nifti", src, out],
    }
    rows = []
    series = [
        ("uncompressed", plain, "SimpleITK"),
        ("JPEG Lossless SV1", lossless, "SimpleITK"),
        ("HTJ2K lossless", htj2k, "SimpleITK"),
        ("JPEG Extended 12-bit", extended, "dicom2nifti"),
    ]
    for label, src, reference in series:
        # Warm the page cache so that every tool reads from memory.
        for name in os.listdir(src):
            with open(os.path.join(src, name), "rb") as f:
                f.read()
        used = {t: c for t, c in tools.items() if t != "SimpleITK" or reference == t}
        results = {t: [] for t in used}
        for _ in range(args.runs):
            for tool, cmd in used.items():
                out = os.path.join(work, f"{tool}-{label.split()[0]}.nii.gz")
                results[tool].append(timed(cmd(src, out)))
        against = os.path.join(work, f"SimpleITK-{label.split()[0]}.nii.gz")
        if reference != "SimpleITK":
            subprocess.run(tools["SimpleITK"](extended_ijg, against), check=True)
        agree = subprocess.run(
            [python, TOOLS, "compare",
             os.path.join(work, f"radflow-{label.split()[0]}.nii.gz"), against],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        ref_wall = statistics.median(w for w, _ in results[reference])
        for tool, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            rss = statistics.median(r for _, r in runs)
            ratio = f"{ref_wall / wall:.1f}x vs {reference}"
            rows.append((label, size_mb(src), tool, wall, ratio, rss, runs))
        versus = "SimpleITK" if reference == "SimpleITK" else "SimpleITK on dcmdjpeg's"
        rows.append((label, None, f"radflow vs {versus} output", agree, None, None, None))

    print(f"CPU: {os.cpu_count()} cores; runs per tool: {args.runs} (median)\n")
    print("| series | size | tool | wall s | speed | peak RSS MiB | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, mb, tool, wall, ratio, rss, runs in rows:
        if tool.startswith("radflow vs"):
            fields = wall.split(" ")
            text = f"mean {fields[0]} HU, p99 {fields[1]} HU" if len(fields) > 2 else wall
            print(f"| {label} | | {tool} | {text} | | | |")
            continue
        print(
            f"| {label} | {mb:.0f} MB | {tool} | {wall:.2f} | {ratio} | {rss:.0f} | "
            + ", ".join(f"{w:.2f}" for w, _ in runs) + " |"
        )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
