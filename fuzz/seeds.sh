#!/usr/bin/env bash
# Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ from files made
# here: radflow's synthetic CT (32 x 32), re-encoded by DCMTK (JPEG lossless and
# extended, RLE, JPEG-LS), the hostile C-STORE corpus, the bytes a real storescu sends
# (captured through a relay), NIfTI files written by radflow. Needs a built radflow
# (RADFLOW=path), DCMTK and the repository's .venv.
#
#   fuzz/seeds.sh            # rewrites fuzz/corpus
set -euo pipefail
cd "$(dirname "$0")/.."
radflow="${RADFLOW:-${CARGO_TARGET_DIR:-target}/debug/radflow}"
python=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT
out=fuzz/corpus
rm -rf "$out"
mkdir -p "$out"/{listener_dataset,listener_pdus,listener_commands,preprocessor_file,preprocessor_jpeg,preprocessor_csa,preprocessor_series,volume_nifti_reader,volume_nifti_writer}

"$radflow" synth --out "$work/ct" --size 32 --slices 4 --seed 3 >/dev/null
"$radflow" synth --out "$work/imp" --size 32 --slices 2 --seed 4 --implicit >/dev/null
"$radflow" synth --out "$work/enh" --size 16 --slices 3 --seed 5 --enhanced >/dev/null
mapfile -t slices < <(find "$work/ct" -name '*.dcm' | sort)
first=${slices[0]}
dcmcjpeg +e1 "$first" "$work/jpeg-sv1.dcm"
dcmcjpeg +ee "$first" "$work/jpeg-extended.dcm"
dcmcrle "$first" "$work/rle.dcm"
dcmcjpls "$first" "$work/jpeg-ls.dcm"
for f in "$first" "$work/imp"/*.dcm "$work/enh"/*.dcm "$work"/*.dcm tests/fixtures/hostile/*.dcm; do
  cp "$f" "$out/preprocessor_file/$(basename "$(dirname "$f")")-$(basename "$f")"
done

# Datasets without their File Meta group, the first byte choosing the transfer syntax
# as radflow_listener::fuzzing::dataset reads it; JPEG codestreams with the three bytes
# (rows, columns, sample size) that radflow_preprocessor::fuzzing::jpeg reads first.
"$python" - "$out" "$work" tests/fixtures/hostile/*.dcm "$work"/*.dcm "$first" <<'PY'
import struct, sys
from pathlib import Path
out, work, files = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
syntaxes = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"]
for f in files:
    data = Path(f).read_bytes()
    (meta_len,) = struct.unpack("<I", data[140:144])
    meta, dataset = data[144:144 + meta_len], data[144 + meta_len:]
    ts = next((i for i, t in enumerate(syntaxes) if t.encode() + b"\0" in meta or meta.endswith(t.encode())), 1)
    (out / "listener_dataset" / Path(f).name).write_bytes(bytes([ts]) + dataset)
    if b"\xff\xd8" in dataset and b"\xff\xd9" in dataset:
        start = dataset.index(b"\xff\xd8")
        stream = dataset[start:dataset.rindex(b"\xff\xd9") + 2]
        (out / "preprocessor_jpeg" / (Path(f).stem + ".jpg")).write_bytes(bytes([31, 31, 1]) + stream)
PY

# A series as radflow_preprocessor::fuzzing::series reads it: files joined by its separator.
"$python" - "$out/preprocessor_series/ct4" "${slices[@]}" <<'PY'
import sys
from pathlib import Path
sep = b"\xff\xfe\xfd\xfcnext"
Path(sys.argv[1]).write_bytes(sep.join(Path(f).read_bytes() for f in sys.argv[2:]))
PY

# What storescu really sends, captured through a relay in front of radflow run.
port=$((20000 + RANDOM % 20000)); relay=$((port + 1))
ort=$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)
radflow=$(realpath "$radflow")
(cd "$work" && ORT_DYLIB_PATH="$ort" "$radflow" run --dicom-port "$port" --http-port $((port + 2)) >/dev/null 2>&1) &
"$python" - "$relay" "$port" "$out/listener_pdus/storescu-ct" <<'PY' &
import socket, sys, threading
relay, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", relay)); srv.listen(1)
client, _ = srv.accept()
up = socket.create_connection(("127.0.0.1", port))
captured = bytearray()
def down():
    while (b := up.recv(65536)):
        client.sendall(b)
    client.close()
threading.Thread(target=down, daemon=True).start()
while (b := client.recv(65536)):
    captured += b
    up.sendall(b)
up.shutdown(socket.SHUT_WR)
open(path, "wb").write(captured)
PY
capture=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
sleep 0.5
/usr/bin/storescu -aec RADFLOW 127.0.0.1 "$relay" "$first" "${slices[1]}" >/dev/null
wait "$capture"

# The command sets inside that capture (P-DATA-TF values with the command bit).
"$python" - "$out/listener_pdus/storescu-ct" "$out/listener_commands" <<'PY'
import struct, sys
from pathlib import Path
data, out = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
i, n, command = 0, 0, b""
while i + 6 <= len(data):
    kind, length = data[i], struct.unpack(">I", data[i + 2:i + 6])[0]
    body, i = data[i + 6:i + 6 + length], i + 6 + length
    if kind != 4:
        continue
    j = 0
    while j + 6 <= len(body):
        (item_len,) = struct.unpack(">I", body[j:j + 4])
        header, value = body[j + 5], body[j + 6:j + 4 + item_len]
        j += 4 + item_len
        if header & 1:
            command += value
            if header & 2:
                n += 1
                (out / f"command-{n}").write_bytes(command)
                command = b""
PY

"$radflow" volume "$work/ct" --out "$work/v.nii.gz" >/dev/null 2>&1
"$radflow" volume "$work/ct" --out "$work/v.nii" --gzip-level 0 >/dev/null 2>&1 || true
cp "$work"/v.nii* "$out/volume_nifti_reader/"
printf '\x03\x02\x01\x00\x00\x80\x3f' > "$out/volume_nifti_writer/small"
"$python" -c "import sys; sys.stdout.buffer.write(bytes((i * 37 + 11) % 256 for i in range(512)))" > "$out/volume_nifti_writer/pattern"
printf 'SV10\x04\x03\x02\x01' > "$out/preprocessor_csa/magic"
du -sh "$out"; find "$out" -type f | wc -l
