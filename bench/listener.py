#!/usr/bin/env python3
"""Listener throughput: DCMTK storescu sending a 300-slice 512x512 CT series to
radflow (file store or the compose stack's S3 server, SeaweedFS; NATS JetStream) and to
DCMTK storescp (writing to disk).

Every configuration runs in this one process, on this machine, with the same sender
and the same files, interleaved round by round (median per configuration); radflow gets a fresh nats-server and a fresh store each run.
TCP_NODELAY=1 is set for DCMTK on both sides. Reports instances/s, MB/s, the
receiver's peak RSS (wait4 maximum resident set size, children included), radflow's
flushes per instance (from its `radflow_listener_store_flushes_total` counters) and,
for every ratio against storescp, its median and spread over the rounds.

Usage: python3 bench/listener.py [--radflow target/release/radflow] [--runs 3] [--work DIR]
                                 [--associations 1,4,8,16]
                                 [--s3]   (adds radflow on SeaweedFS, .venv/bin/weed)
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ENV = dict(os.environ, TCP_NODELAY="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited early ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def stop(proc):
    """SIGTERM, then wait4: returns the peak RSS in MiB (the process and its children)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, _, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        return float("nan")
    proc.returncode = 0
    return usage.ru_maxrss / 1024


def send(port, groups, called_ae):
    """One storescu per group, all at once; returns wall seconds until the last ends."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)]
            + group,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for group in groups
    ]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {out.decode(errors='replace')}")
    return time.perf_counter() - started


def split(files, n):
    return [files[i::n] for i in range(n)]


def run_storescp(work, files, associations, fork, ignore=False):
    out = tempfile.mkdtemp(dir=work, prefix="storescp-")
    port = free_port()
    cmd = ["/usr/bin/storescp", "-od", out, "-aet", "STORESCP"]
    if fork:
        cmd.append("--fork")
    if ignore:
        cmd.append("--ignore")
    proc = subprocess.Popen(cmd + [str(port)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    seconds = send(port, split(files, associations), "STORESCP")
    rss = stop(proc)
    stored = len(os.listdir(out))
    shutil.rmtree(out)
    if stored != (0 if ignore else len(files)):
        raise SystemExit(f"storescp stored {stored} of {len(files)}")
    return seconds, rss


S3_KEY, S3_SECRET = "bench", "bench-secret"


def start_seaweedfs(base):
    """SeaweedFS (`weed server -s3`) on free ports with bucket `radflow`; returns
    (process, S3 endpoint)."""
    weed = shutil.which("weed") or ".venv/bin/weed"
    data = os.path.join(base, "weed")
    os.makedirs(data)
    config = os.path.join(base, "s3.json")
    with open(config, "w") as f:
        f.write('{"identities":[{"name":"bench","credentials":[{"accessKey":"%s",'
                '"secretKey":"%s"}],"actions":["Admin","Read","Write","List"]}]}'
                % (S3_KEY, S3_SECRET))
    p = {k: free_port() for k in ("master", "mgrpc", "volume", "vgrpc", "filer", "fgrpc",
                                  "s3", "s3grpc")}
    proc = subprocess.Popen(
        [weed, "server", "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1", "-dir", data,
         "-master.port", str(p["master"]), "-master.port.grpc", str(p["mgrpc"]),
         "-master.volumeSizeLimitMB", "1024",
         "-volume.port", str(p["volume"]), "-volume.port.grpc", str(p["vgrpc"]),
         "-filer.port", str(p["filer"]), "-filer.port.grpc", str(p["fgrpc"]),
         "-s3", "-s3.port", str(p["s3"]), "-s3.port.grpc", str(p["s3grpc"]),
         "-s3.port.iceberg", "0", "-s3.port.lance", "0", "-s3.config", config],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(p["s3"], proc, timeout=60)
    deadline = time.time() + 60
    while True:
        try:
            # No body: with one, urllib adds a form Content-Type that the filer refuses
            # ("isn't multipart/form-data"); a bodiless POST makes the folder.
            req = urllib.request.Request(f"http://127.0.0.1:{p['filer']}/buckets/radflow/",
                                         method="POST")
            urllib.request.urlopen(req, timeout=2).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise SystemExit("SeaweedFS did not create the bucket")
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{p['s3']}"
    # The gateway answers before the volume server takes data: wait for a signed write.
    while subprocess.run(["curl", "-sf", "-o", "/dev/null", "--aws-sigv4", "aws:amz:us-east-1:s3",
                          "--user", f"{S3_KEY}:{S3_SECRET}", "-T", config,
                          f"{endpoint}/radflow/probe"]).returncode != 0:
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("SeaweedFS did not take a write")
        time.sleep(0.2)
    subprocess.run(["curl", "-sf", "-X", "DELETE", "--aws-sigv4", "aws:amz:us-east-1:s3",
                    "--user", f"{S3_KEY}:{S3_SECRET}", f"{endpoint}/radflow/probe"])
    return proc, endpoint


def s3_count(endpoint, prefix):
    out = subprocess.run(["curl", "-sf", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                          f"{S3_KEY}:{S3_SECRET}",
                          f"{endpoint}/radflow?list-type=2&max-keys=1000&prefix={prefix}"],
                         capture_output=True, check=True).stdout.decode()
    return out.count("<Key>")


def flushes(http):
    """Flushes of the folder store and instances stored so far, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    total, instances = 0, 0
    for line in text.splitlines():
        if line.startswith("radflow_listener_store_flushes_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("radflow_dicom_instances_stored_total "):
            instances = int(float(line.rsplit(" ", 1)[1]))
    return total, instances


def run_radflow(work, radflow, nats_server, files, associations, fsync, journal=False,
                s3=False):
    base = tempfile.mkdtemp(dir=work, prefix="radflow-")
    nats_port, dicom, http = free_port(), free_port(), free_port()
    nats = subprocess.Popen([nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                             "-sd", os.path.join(base, "nats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(nats_port, nats)
    store = os.path.join(base, "store")
    env = ENV
    if s3:
        weed, endpoint = start_seaweedfs(base)
        store_url = "s3://radflow"
        env = dict(ENV, AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1",
                   AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    else:
        store_url = f"file://{store}"
    proc = subprocess.Popen(
        [radflow, "listener", "--nats-url", f"nats://127.0.0.1:{nats_port}",
         "--store-url", store_url, "--store-fsync", "true" if fsync else "false",
         "--store-journal", "true" if journal else "false",
         "--dicom-port", str(dicom), "--http-port", str(http), "--log", "warn",
         "--series-quiet-secs", "60"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(dicom, proc)
    seconds = send(dicom, split(files, associations), "RADFLOW")
    # Flushes until now, and those of the checkpoint that closing makes are not
    # counted: they are the same for every configuration that has them.
    flushed, instances = flushes(http)
    rss = stop(proc)
    nats_rss = stop(nats)
    if s3:
        stored = s3_count(endpoint, "dicom%2F")
        stop(weed)
    else:
        stored = sum(len(fs) for _, _, fs in os.walk(os.path.join(store, "dicom")))
    shutil.rmtree(base)
    if stored != len(files) or instances != len(files):
        raise SystemExit(f"radflow stored {stored} ({instances} counted) of {len(files)}")
    return seconds, rss, nats_rss, flushed / instances


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radflow", default="target/release/radflow")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--work", default=None,
                    help="folder for the stores (its file system is what is measured)")
    ap.add_argument("--associations", default="1,4",
                    help="comma-separated association counts (storescp --fork above 1)")
    ap.add_argument("--s3", action="store_true",
                    help="also radflow on the compose stack's S3 server (SeaweedFS)")
    args = ap.parse_args()
    nats_server = shutil.which("nats-server") or ".venv/bin/nats-server"
    work = tempfile.mkdtemp(prefix="radflow-bench-", dir=args.work)
    try:
        series = os.path.join(work, "series")
        subprocess.run([args.radflow, "synth", "--out", series, "--size", "512",
                        "--slices", str(args.slices), "--seed", "3"], check=True,
                       stdout=subprocess.DEVNULL)
        files = sorted(os.path.join(series, f) for f in os.listdir(series)
                       if f.endswith(".dcm"))
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        print(f"{len(files)} files, {megabytes:.1f} MB, median of {args.runs} runs",
              file=sys.stderr)
        counts = [int(a) for a in args.associations.split(",")]
        configs = []
        for a in counts:
            fork = a > 1
            tag = "storescp --fork" if fork else "storescp"
            configs += [
                (f"{tag} --ignore (receives, stores nothing)", a,
                 lambda a=a, f=fork: run_storescp(work, files, a, f, True)),
                (f"{tag} (no flush)", a, lambda a=a, f=fork: run_storescp(work, files, a, f)),
                ("radflow, fsync + JetStream", a,
                 lambda a=a: run_radflow(work, args.radflow, nats_server, files, a, True)),
                ("radflow, journal + JetStream", a,
                 lambda a=a: run_radflow(work, args.radflow, nats_server, files, a, True, True)),
                ("radflow, no fsync + JetStream", a,
                 lambda a=a: run_radflow(work, args.radflow, nats_server, files, a, False)),
            ]
        if args.s3:
            for assocs in (1, 4):
                configs.append((
                    "radflow, S3 (SeaweedFS) + JetStream", assocs,
                    lambda a=assocs: run_radflow(work, args.radflow, nats_server, files, a,
                                                 False, s3=True)))
        # Interleaved: each round runs every configuration once, so load from other
        # processes on the machine falls on all of them alike.
        by_config = [[] for _ in configs]
        for _ in range(args.runs):
            for i, (_, _, fn) in enumerate(configs):
                by_config[i].append(fn())
        rows = []
        for (name, assocs, _), results in zip(configs, by_config):
            secs = statistics.median(r[0] for r in results)
            rss = max(r[1] for r in results)
            extra = f" (nats-server {max(r[2] for r in results):.0f})" if len(results[0]) > 2 else ""
            per = (f"{statistics.median(r[3] for r in results):.2f}"
                   if len(results[0]) > 3 else "0")
            rows.append((name, assocs, secs, rss, extra, per, [r[0] for r in results]))
            print(f"{name} x{assocs}: {secs:.2f} s", file=sys.stderr)
        print("| receiver | associations | seconds | instances/s | MB/s | peak RSS MiB "
              "| flushes/instance |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, assocs, secs, rss, extra, per, _ in rows:
            print(f"| {name} | {assocs} | {secs:.2f} | {len(files)/secs:.0f} | "
                  f"{megabytes/secs:.0f} | {rss:.0f}{extra} | {per} |")
        # The disk's own floor for per-instance durability: the same number of writes
        # of the same size, each flushed before the next (no network, no parsing).
        size_kib = int(megabytes * 1e6 / len(files) / 1024)
        target = os.path.join(work, "dd.out")
        started = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={size_kib}k",
                        f"count={len(files)}", "oflag=dsync"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dd = time.perf_counter() - started
        os.remove(target)
        print(f"| dd oflag=dsync, {len(files)} x {size_kib} KiB (disk floor, no network) | - | "
              f"{dd:.2f} | {len(files)/dd:.0f} | {megabytes/dd:.0f} | - |")
        # Ratios round by round (each round ran every configuration once), so the
        # spread is that of ratios taken under the same load.
        ref = {a: t for n, a, _, _, _, _, t in rows
               if n.startswith("storescp") and "--ignore" not in n}
        floor = {a: t for n, a, _, _, _, _, t in rows if "--ignore" in n}
        print("\n| radflow | associations | vs | median ratio | spread over rounds |"
              " ceiling: storescp --ignore vs storescp |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for name, assocs, _, _, _, _, times in rows:
            if name.startswith("radflow"):
                ratios = [r / t for r, t in zip(ref[assocs], times)]
                best = [r / t for r, t in zip(ref[assocs], floor[assocs])]
                print(f"| {name} | {assocs} | storescp{' --fork' if assocs > 1 else ''} | "
                      f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
                      f"{statistics.median(best):.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
