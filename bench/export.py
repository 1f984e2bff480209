#!/usr/bin/env python3
"""The round trip through a PACS: Orthanc (Debian's `orthanc`) holds a CT series
(radflow's phantom), sends it to radflow (`POST /modalities/radflow/store`, Orthanc as
the C-STORE SCU), radflow (`radflow run` with a destinations file: listener,
preprocessor, inferer with the demo model, exporter) sends the SEG and the SR back,
and the time until Orthanc's REST API lists both in the source study is taken.

The export step alone (from the result, `summary.json`'s `created_at_ms`, to both
objects in Orthanc, polled every 20 ms) is compared with DCMTK's storescu sending the
same two files to the same Orthanc (process start to exit), the reference for one
association carrying two objects.

Usage: python3 bench/export.py [--radflow PATH] [--slices 120] [--size 512] [--runs 3]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, predicate, timeout=300, every=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


class Orthanc:
    def __init__(self, base, radflow_port):
        self.http, self.dicom = free_port(), free_port()
        self.dir = os.path.join(base, "orthanc")
        os.makedirs(self.dir)
        config = {
            "Name": "radflow-bench", "StorageDirectory": os.path.join(self.dir, "storage"),
            "IndexDirectory": os.path.join(self.dir, "index"), "HttpPort": self.http,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC", "DicomPort": self.dicom, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
            "DicomModalities": {"radflow": ["RADFLOW", "127.0.0.1", radflow_port]},
            "Plugins": [], "LuaScripts": [], "SaveJobs": False,
        }
        path = os.path.join(self.dir, "orthanc.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(self.dir, "orthanc.log"), "w")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", path], cwd=self.dir,
                                     stdout=self.log, stderr=self.log)
        wait("Orthanc", lambda: self._ok("/system"), timeout=60, every=0.1)

    def _ok(self, path):
        try:
            return self.get(path) is not None
        except OSError:
            return False

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=120) as r:
            return json.loads(r.read())

    def post(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def modalities_in(self, study):
        return sorted(self.get(f"/series/{s}")["MainDicomTags"].get("Modality", "")
                      for s in self.get(f"/studies/{study}")["Series"])

    def delete_results(self, study):
        for s in self.get(f"/studies/{study}")["Series"]:
            if self.get(f"/series/{s}")["MainDicomTags"].get("Modality") in ("SEG", "SR"):
                req = urllib.request.Request(f"http://127.0.0.1:{self.http}/series/{s}",
                                             method="DELETE")
                urllib.request.urlopen(req, timeout=60).read()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def one_round(args, work, series_files):
    base = tempfile.mkdtemp(prefix="round-", dir=work)
    dicom_port, http_port = free_port(), free_port()
    orthanc = Orthanc(base, dicom_port)
    destinations = os.path.join(base, "destinations.toml")
    with open(destinations, "w") as f:
        f.write(f'[[destination]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                f'port = {orthanc.dicom}\n\n[[route]]\nto = ["pacs"]\n')
    for path in series_files:
        with open(path, "rb") as f:
            orthanc.post("/instances", f.read())
    study = orthanc.get("/studies")[0]
    data = os.path.join(base, "data")
    log = open(os.path.join(base, "radflow.log"), "w")
    radflow = subprocess.Popen(
        [args.radflow, "run", "--data", data, "--dicom-port", str(dicom_port),
         "--http-port", str(http_port), "--series-quiet-secs", "1",
         "--destinations", destinations],
        stdout=log, stderr=log, cwd=ROOT,
    )
    try:
        wait("radflow", lambda: socket.socket().connect_ex(("127.0.0.1", dicom_port)) == 0,
             timeout=60)
        t0 = time.time()
        orthanc.post("/modalities/radflow/store", study.encode())
        sent = time.time() - t0
        wait("SEG and SR in Orthanc",
             lambda: orthanc.modalities_in(study) == ["CT", "SEG", "SR"], timeout=600)
        total = time.time() - t0
        results = os.path.join(data, "results")
        summary_path = next(
            os.path.join(d, "summary.json") for d, _, files in os.walk(results)
            if "summary.json" in files
        )
        with open(summary_path) as f:
            summary = json.load(f)
        # The poll found both objects at `total`; the export step ended then.
        export_step = total - (summary["created_at_ms"] / 1000 - t0)
        files = [os.path.join(os.path.dirname(summary_path), o["file"]) for o in summary["dicom"]]
        orthanc.delete_results(study)
        t1 = time.time()
        subprocess.run(["/usr/bin/storescu", "-R", "-aet", "RADFLOW", "-aec", "ORTHANC", "127.0.0.1",
                        str(orthanc.dicom)] + files, check=True, env={**os.environ, "TCP_NODELAY": "1"})
        storescu = time.time() - t1
        wait("storescu's objects in Orthanc",
             lambda: orthanc.modalities_in(study) == ["CT", "SEG", "SR"], timeout=60)
        sizes = sum(os.path.getsize(f) for f in files)
        return {"send_s": sent, "total_s": total, "export_s": export_step,
                "storescu_s": storescu, "objects_bytes": sizes}
    finally:
        radflow.terminate()
        try:
            radflow.wait(timeout=30)
        except subprocess.TimeoutExpired:
            radflow.kill()
        orthanc.stop()


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--radflow", default=os.path.join(target, "release/radflow"))
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="radflow-bench-export-")
    series = os.path.join(work, "ct")
    subprocess.run([args.radflow, "synth", "--out", series, "--slices", str(args.slices),
                    "--size", str(args.size), "--seed", "5"], check=True,
                   stdout=subprocess.DEVNULL)
    files = sorted(os.path.join(series, f) for f in os.listdir(series) if f.endswith(".dcm"))
    rounds = [one_round(args, work, files) for _ in range(args.runs)]

    def med(key):
        return statistics.median(r[key] for r in rounds)

    print(f"CPU: {os.cpu_count()} cores; {args.runs} runs (median); CT {args.size}x{args.size}"
          f"x{args.slices}; SEG + SR {rounds[0]['objects_bytes'] / 1e6:.2f} MB\n")
    print("| step | median s | runs (s) |")
    print("| --- | --- | --- |")
    for key, what in [("send_s", "Orthanc sends the study to radflow (REST call, synchronous C-STORE)"),
                      ("total_s", "from that call to SEG and SR listed in Orthanc's study"),
                      ("export_s", "export step: result written → both objects in Orthanc"),
                      ("storescu_s", "reference: storescu sends the same two files to Orthanc")]:
        print(f"| {what} | {med(key):.3f} | {' '.join(f'{r[key]:.3f}' for r in rounds)} |")
    print(f"\nexport step / storescu: {med('export_s') / med('storescu_s'):.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
