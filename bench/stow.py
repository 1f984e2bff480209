#!/usr/bin/env python3
"""STOW-RS against C-STORE into the same durable listener: the 300-slice 512x512 CT
(`radflow synth`) sent to `radflow listener` (folder store with fsync, NATS JetStream)
once by DCMTK storescu (C-STORE) and once over HTTP as STOW-RS (multipart/related,
Part-10 files as they are on disk, streamed by `requests` with chunked transfer
encoding: the client holds one file at a time).

Both answer an instance as stored only once it is fsynced and its event acknowledged
by JetStream. Each run gets a fresh nats-server and a fresh store; configurations are
interleaved round by round (median per configuration). N requests / associations run
at once, each with 1/N of the files. Reports seconds, instances/s, MB/s and the
listener's peak RSS (wait4, children included): a STOW-RS body of 150 MB must not
raise it.

With --large-gb N it also sends one instance of N GB (512x512 16-bit frames, made
while sending, never on disk before the listener writes it) as one STOW-RS request and
reports the time and the listener's peak RSS: memory must not follow the size.

Usage: python3 bench/stow.py [--radflow target/release/radflow] [--runs 3] [--work DIR]
                             [--large-gb 2]
"""

import argparse
import io
import os
import struct
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests


def wait_ready(http, timeout=60):
    """Until /readyz answers 200: the listener serves (and takes STOW-RS)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{http}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise SystemExit("the listener did not become ready")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from listener import ENV, free_port, send, split, stop, wait_port  # noqa: E402

BOUNDARY = "radflow-bench-6d1e"


def body(files):
    """The multipart/related body, one file at a time."""
    for f in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def stow(http, files):
    r = requests.post(
        f"http://127.0.0.1:{http}/dicomweb/studies",
        data=body(files),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
        },
        timeout=600,
    )
    if r.status_code != 200:
        raise SystemExit(f"STOW-RS answered {r.status_code}: {r.text[:500]}")
    stored = len(r.json().get("00081199", {}).get("Value", []))
    if stored != len(files):
        raise SystemExit(f"STOW-RS stored {stored} of {len(files)}")


def stow_all(http, groups):
    started = time.perf_counter()
    errors = []

    def one(group):
        try:
            stow(http, group)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"STOW-RS failed: {errors[0]}")
    return time.perf_counter() - started


def large_instance(gigabytes):
    """(Part-10 bytes up to the Pixel Data value, pixel data length) of a multi-frame
    CT of about `gigabytes` GB."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    frame = 512 * 512 * 2
    frames = int(gigabytes * 1e9 // frame)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    b = io.BytesIO()
    pydicom.dcmwrite(b, ds, enforce_file_format=True)
    length = frames * frame
    return b.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length), length


def large(work, radflow, nats_server, gigabytes):
    """Seconds and peak RSS of one STOW-RS request holding one `gigabytes` GB instance."""
    head, length = large_instance(gigabytes)

    def body():
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        zeros = bytes(1 << 20)
        left = length
        while left:
            n = min(left, len(zeros))
            yield zeros[:n]
            left -= n
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    base = tempfile.mkdtemp(dir=work, prefix="radflow-large-")
    nats_port, dicom, http = free_port(), free_port(), free_port()
    nats = subprocess.Popen([nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                             "-sd", os.path.join(base, "nats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(nats_port, nats)
    store = os.path.join(base, "store")
    proc = subprocess.Popen(
        [radflow, "listener", "--nats-url", f"nats://127.0.0.1:{nats_port}",
         "--store-url", f"file://{store}", "--store-fsync", "true",
         "--dicom-port", str(dicom), "--http-port", str(http), "--log", "warn",
         "--series-quiet-secs", "60", "--dicomweb", "true"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(dicom, proc)
    wait_ready(http)
    started = time.perf_counter()
    r = requests.post(
        f"http://127.0.0.1:{http}/dicomweb/studies", data=body(),
        headers={"Content-Type":
                 f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
        timeout=1800)
    seconds = time.perf_counter() - started
    rss = stop(proc)
    stop(nats)
    sizes = [os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(os.path.join(store, "dicom")) for f in fs]
    shutil.rmtree(base)
    if r.status_code != 200 or sizes != [len(head) + length]:
        raise SystemExit(f"large instance: HTTP {r.status_code}, stored {sizes}: {r.text[:300]}")
    return seconds, rss, (len(head) + length) / 1e9


def run(work, radflow, nats_server, files, parallel, how):
    base = tempfile.mkdtemp(dir=work, prefix="radflow-")
    nats_port, dicom, http = free_port(), free_port(), free_port()
    nats = subprocess.Popen([nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                             "-sd", os.path.join(base, "nats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(nats_port, nats)
    store = os.path.join(base, "store")
    proc = subprocess.Popen(
        [radflow, "listener", "--nats-url", f"nats://127.0.0.1:{nats_port}",
         "--store-url", f"file://{store}", "--store-fsync", "true",
         "--dicom-port", str(dicom), "--http-port", str(http), "--log", "warn",
         "--series-quiet-secs", "60", "--dicomweb", "true"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(dicom, proc)
    wait_ready(http)
    groups = split(files, parallel)
    if how == "stow":
        seconds = stow_all(http, groups)
    else:
        seconds = send(dicom, groups, "RADFLOW")
    rss = stop(proc)
    stop(nats)
    stored = sum(len(fs) for _, _, fs in os.walk(os.path.join(store, "dicom")))
    shutil.rmtree(base)
    if stored != len(files):
        raise SystemExit(f"radflow stored {stored} of {len(files)}")
    return seconds, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--radflow", default="target/release/radflow")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--work", default=None)
    ap.add_argument("--large-gb", type=float, default=0)
    args = ap.parse_args()
    nats_server = shutil.which("nats-server") or ".venv/bin/nats-server"
    work = tempfile.mkdtemp(prefix="radflow-bench-stow-", dir=args.work)
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
        configs = [(how, n) for n in (1, 4) for how in ("cstore", "stow")]
        results = {c: [] for c in configs}
        for _ in range(args.runs):
            for how, n in configs:
                results[(how, n)].append(run(work, args.radflow, nats_server, files, n, how))
        names = {"cstore": "C-STORE (storescu)", "stow": "STOW-RS (HTTP, chunked)"}
        print("| sender → radflow listener (fsync + JetStream) | at once | seconds (min–max) "
              "| instances/s | MB/s | peak RSS MiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        med = {}
        for (how, n), rs in results.items():
            secs = [r[0] for r in rs]
            m = statistics.median(secs)
            med[(how, n)] = m
            print(f"| {names[how]} | {n} | {m:.2f} ({min(secs):.2f}–{max(secs):.2f}) | "
                  f"{len(files)/m:.0f} | {megabytes/m:.0f} | {max(r[1] for r in rs):.0f} |")
        for n in (1, 4):
            print(f"\nSTOW-RS / C-STORE throughput, {n} at once: "
                  f"{med[('cstore', n)] / med[('stow', n)]:.2f}x", end="")
        print()
        if args.large_gb:
            secs, rss, gb = large(work, args.radflow, nats_server, args.large_gb)
            print(f"\nOne {gb:.2f} GB instance by STOW-RS: {secs:.1f} s "
                  f"({gb * 1e3 / secs:.0f} MB/s), listener peak RSS {rss:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
