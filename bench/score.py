#!/usr/bin/env python3
"""Batch-scoring throughput: series per minute through `radflow score` with 1 and 2
inferer processes (and one preprocessor) on a real nats-server, on this machine.

    python3 bench/score.py [--series 24] [--size 256] [--slices 64] [--threads 0]

Each configuration gets a fresh nats-server and store; `radflow score --folder
... --wait` uploads the same synthetic series and returns once every result is in.
The time from the command's start to its end (upload included) gives series per
minute. `--threads N` sets each inferer's ONNX Runtime intra-op threads (0: one per
core, the default). Prints a Markdown table and the JSON of the measurements.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
RADFLOW = TARGET / "release" / "radflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server() -> str:
    for candidate in [ROOT / ".venv" / "bin" / "nats-server", shutil.which("nats-server")]:
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("nats-server not found: run .ci/setup")


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def wait_ready(port: int, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"worker on {port} never became ready")


def run(config_inferers: int, archive: Path, work: Path, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    nats = subprocess.Popen(
        [nats_server(), "-js", "-p", str(port), "-sd", str(work / "nats"), "-a", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = []
    try:
        wait_port(port)
        url = f"nats://127.0.0.1:{port}"
        store = f"file://{work / 'store'}"
        env = dict(os.environ, RADFLOW_LOG="warn")
        common = ["--nats-url", url, "--store-url", store]
        http = free_port()
        procs.append(
            subprocess.Popen(
                [str(RADFLOW), "preprocessor", *common, "--http-port", str(http)],
                env=env,
                stderr=open(work / "preprocessor.log", "w"),
            )
        )
        ready = []
        for i in range(config_inferers):
            http = free_port()
            extra = ["--intra-threads", str(threads)] if threads else []
            procs.append(
                subprocess.Popen(
                    [str(RADFLOW), "inferer", *common, "--http-port", str(http), *extra],
                    env=env,
                    stderr=open(work / f"inferer-{i}.log", "w"),
                )
            )
            ready.append(http)
        for http in ready:
            wait_ready(http)
        started = time.perf_counter()
        out = subprocess.run(
            [str(RADFLOW), "score", "--model", "demo-tissue", "--folder", str(archive),
             "--wait", "--max-in-flight", "8", "--report", str(work / "report"), *common],
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"radflow score failed:\n{out.stdout}\n{out.stderr}")
        rows = [json.loads(l) for l in (work / "report.jsonl").read_text().splitlines()]
        scored = sum(r["status"] == "scored" for r in rows)
        return {
            "inferers": config_inferers,
            "series": len(rows),
            "scored": scored,
            "seconds": round(elapsed, 2),
            "series_per_min": round(60 * scored / elapsed, 1),
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        nats.terminate()
        nats.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--series", type=int, default=24)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-build", action="store_true", help="use the release binary as it is")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "radflow-bench-score")
    args = p.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "--bin", "radflow"], check=True, cwd=ROOT)
    shutil.rmtree(args.work, ignore_errors=True)
    archive = args.work / "archive"
    for i in range(args.series):
        subprocess.run(
            [str(RADFLOW), "synth", "--out", str(archive / f"s{i:03}"), "--size", str(args.size),
             "--slices", str(args.slices), "--spacing", "2.5", "--seed", str(i + 1)],
            check=True,
            capture_output=True,
        )
    results = [run(n, archive, args.work / f"run-{n}", args.threads) for n in (1, 2)]
    print("| inferers | series | seconds | series/min |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['inferers']} | {r['scored']} | {r['seconds']} | {r['series_per_min']} |")
    print(f"speed-up with 2 inferers: {results[1]['series_per_min'] / results[0]['series_per_min']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
