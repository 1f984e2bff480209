#!/usr/bin/env python3
"""Load: 10,000 instances over 8 concurrent associations into the distributed stack
(nats-server with JetStream, `radflow listener` on a durable folder store,
`radflow preprocessor`, `radflow inferer` with the demo model), then every series
through to its result.

The instances are 80 series of radflow's phantom (128 x 128 x 125, distinct seeds and
UIDs), sent by 8 DCMTK storescu processes at once, one association each, 10 series per
association. Reported: instances/s from the first storescu start to the last exit,
failed associations and refused instances (storescu's exit status and its
"Status" lines), the listener's resident set sampled every 0.2 s (start, median and
peak), instances in the store, and the time until the last series has its result.

Usage: python3 bench/load.py [--radflow PATH] [--series 80] [--slices 125]
                             [--associations 8] [--keep DIR]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, TCP_NODELAY="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--radflow", default=os.path.join(target, "release/radflow"))
    ap.add_argument("--series", type=int, default=80)
    ap.add_argument("--slices", type=int, default=125)
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--keep", help="folder for the series and the stack's data (kept)")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="radflow-bench-load-")
    os.makedirs(work, exist_ok=True)
    series_root = os.path.join(work, "series")
    if not os.path.isdir(series_root):
        for i in range(args.series):
            subprocess.run([args.radflow, "synth", "--out", os.path.join(series_root, f"{i:03}"),
                            "--size", "128", "--slices", str(args.slices), "--seed",
                            str(1000 + i)], check=True, stdout=subprocess.DEVNULL)
    per_series = []
    for name in sorted(os.listdir(series_root)):
        d = os.path.join(series_root, name)
        per_series.append(sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".dcm")))
    total = sum(len(s) for s in per_series)
    groups = [[f for s in per_series[a::args.associations] for f in s]
              for a in range(args.associations)]

    run = tempfile.mkdtemp(prefix="run-", dir=work)
    nats_server = shutil.which("nats-server") or os.path.join(ROOT, ".venv/bin/nats-server")
    nats_port = free_port()
    procs = []
    logs = []

    def start(name, cmd):
        log = open(os.path.join(run, f"{name}.log"), "w")
        logs.append(log)
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=ENV, cwd=ROOT)
        procs.append(p)
        return p

    nats = start("nats", [nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                          "-sd", os.path.join(run, "nats")])
    wait_port(nats_port, nats)
    common = ["--nats-url", f"nats://127.0.0.1:{nats_port}",
              "--store-url", f"file://{os.path.join(run, 'store')}", "--log", "warn"]
    dicom = free_port()
    listener = start("listener", [args.radflow, "listener", *common, "--dicom-port", str(dicom),
                                  "--http-port", str(free_port()), "--series-quiet-secs", "3"])
    start("preprocessor", [args.radflow, "preprocessor", *common, "--http-port",
                           str(free_port())])
    start("inferer", [args.radflow, "inferer", *common, "--http-port", str(free_port())])
    wait_port(dicom, listener)

    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            r = rss_kib(listener.pid)
            if r:
                samples.append(r)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    senders = [subprocess.Popen(["/usr/bin/storescu", "-aec", "RADFLOW", "-aet", f"LOAD{a}",
                                 "-v", "127.0.0.1", str(dicom), *files],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
               for a, files in enumerate(groups)]
    outputs = [s.communicate()[0].decode(errors="replace") for s in senders]
    seconds = time.time() - t0
    failed_assocs = sum(1 for s in senders if s.returncode != 0)
    refused = sum(o.count("Received Store Response (") - o.count("(Success)") for o in outputs)
    store_dicom = os.path.join(run, "store", "dicom")
    stored = sum(len([f for f in fs if f.endswith(".dcm")]) for _, _, fs in os.walk(store_dicom))

    results_root = os.path.join(run, "store", "results")

    def results():
        return sum(1 for _, _, fs in os.walk(results_root) if "summary.json" in fs)

    deadline = time.time() + 1800
    while results() < len(per_series) and time.time() < deadline:
        time.sleep(0.5)
    to_results = time.time() - t0
    done.set()
    sampler.join()
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    report = {
        "instances": total, "associations": args.associations, "send_s": round(seconds, 2),
        "instances_per_s": round(total / seconds, 1), "failed_associations": failed_assocs,
        "refused_instances": refused, "stored": stored,
        "listener_rss_mib": {
            "start": round(samples[0] / 1024, 1),
            "median": round(statistics.median(samples) / 1024, 1),
            "peak": round(max(samples) / 1024, 1),
        },
        "series": len(per_series), "results": results(),
        "first_send_to_last_result_s": round(to_results, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work)
    if stored != total or failed_assocs or refused:
        raise SystemExit("instances were lost or refused")


if __name__ == "__main__":
    main()
