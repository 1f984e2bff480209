#!/usr/bin/env bash
# End-to-end smoke test of the compose stack on this machine's Docker engine, with no
# registry: builds the images (docker/build-local.sh), starts compose.yaml with
# compose.local.yaml (image names only), then from the host:
#
#   1. measures each radflow container's cold start (process start to /readyz true);
#   2. checks the model fetcher (init container image) against the S3 server: a model
#      with the right SHA-256 is fetched, one with a wrong digest is refused;
#   3. sends a synthetic CT study (`radflow synth` + `radflow send`) and waits for its
#      result in S3, then for its SEG and SR at the PACS: the exporter's destination is
#      DCMTK's storescp on the host (reached as host.docker.internal);
#   3b. sends a series whose UIDs have the full 64 characters (204-character keys) and
#      a real vendor CT file (GE, shipped with pydicom), finds both stored and the
#      series' result in S3;
#   4. sends a second study, kills the inferer's process (SIGKILL) while it holds the
#      job, and checks that Docker restarts it and the result still arrives, once: one
#      result event per series on RADFLOW_RESULTS, one export job per result on
#      RADFLOW_EXPORTS and one SEG and one SR per result at the PACS, nothing
#      dead-lettered, no job left;
#   5. checks that the phantom's patient name and ID appear in no container log.
#
# After start-up it checks NATS's access: TLS required on 4222, every radflow connection
# TLS and authenticated as user radflow, `radflow status` from the host over TLS with
# the CA and password that nats-certs made, and nothing in the clear or without the CA.
#
#   scripts/compose-smoke.sh            (needs root for the first debootstrap, Docker,
#                                        docker-compose, cargo, curl, python3, .venv,
#                                        DCMTK's storescp)
#   RADFLOW_SMOKE_PACS_PORT=11119       the host port of the storescp playing the PACS
#   RADFLOW_SMOKE_SKIP_BUILD=1          reuse the images already built
#   RADFLOW_SMOKE_KEEP=1                leave the stack running afterwards
#
# Results (timings, image sizes) go to target/compose-smoke/results.json, container
# logs to target/compose-smoke/compose.log. Exit status 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

project=${COMPOSE_PROJECT_NAME:-radflowsmoke}
compose=(docker-compose -p "$project" -f compose.yaml -f compose.local.yaml)
version=$(cargo pkgid -p radflow | sed 's/.*[#@]//')
radflow=${RADFLOW_BINARY:-${RADFLOW_DOCKER_TARGET_DIR:-$repo/target/docker-release}/release/radflow}
results_dir=$repo/target/compose-smoke
work=$(mktemp -d)
mkdir -p "$results_dir"
results=$results_dir/results.json
echo '{}' >"$results"

s3_key=${RADFLOW_S3_ACCESS_KEY:-radflow-dev}
s3_secret=${RADFLOW_S3_SECRET_KEY:-radflow-dev-secret}
s3_url=http://127.0.0.1:9000
model_ref=demo-tissue@1.0.0

# The PACS: DCMTK's storescp on the host, the exporter's only destination (compose mounts
# RADFLOW_DESTINATIONS_FILE instead of docker/destinations.toml).
pacs_port=${RADFLOW_SMOKE_PACS_PORT:-11119}
pacs_ae=SMOKE-PACS
pacs_dir=$work/pacs
pacs_pid=
mkdir -p "$pacs_dir"
cat >"$work/destinations.toml" <<TOML
[[destination]]
name = "smoke-pacs"
ae_title = "$pacs_ae"
host = "host.docker.internal"
port = $pacs_port

[[route]]
models = ["demo-tissue"]
to = ["smoke-pacs"]
TOML
chmod 0644 "$work/destinations.toml"
export RADFLOW_DESTINATIONS_FILE=$work/destinations.toml

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
record() { # key json-value
  python3 - "$results" "$1" "$2" <<'PY'
import json, sys
path, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = json.load(open(path))
node = data
*parents, last = key.split(".")
for p in parents:
    node = node.setdefault(p, {})
node[last] = value
json.dump(data, open(path, "w"), indent=2)
PY
}

cleanup() {
  local rc=$?
  "${compose[@]}" logs --no-color --timestamps >"$results_dir/compose.log" 2>&1 || true
  if [[ -z ${RADFLOW_SMOKE_KEEP:-} ]]; then
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    docker volume rm -f "${project}_models-test" >/dev/null 2>&1 || true
  fi
  [[ -z $pacs_pid ]] || kill "$pacs_pid" 2>/dev/null || true
  rm -rf "$work"
  if ((rc == 0)); then log "compose smoke test passed"; else log "compose smoke test FAILED (logs: $results_dir/compose.log)"; fi
}
trap cleanup EXIT

# A signed S3 request from the host (the server checks signatures). curl signs the path
# as written, so characters that S3 percent-encodes in its canonical request ('@' of
# model@version) are written encoded.
s3() { # method key [curl args…]
  local method=$1 key=${2//@/%40}
  shift 2
  curl -s --aws-sigv4 "aws:amz:us-east-1:s3" --user "$s3_key:$s3_secret" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X "$method" "$s3_url/radflow/$key" "$@"
}
s3_status() { s3 HEAD "$1" -o /dev/null -w '%{http_code}' --head; }
s3_list() { # prefix -> keys, one a line (ListObjectsV2)
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$s3_key:$s3_secret" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$s3_url/radflow?list-type=2&prefix=${1//\//%2F}" \
    | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g' || true
}

jsz() { curl -sf "http://127.0.0.1:8222/jsz?streams=true&consumers=true"; }
# Messages ever stored on a stream (a work queue deletes them once acknowledged).
jsz_last_seq() {
  jsz | python3 -c '
import json, sys
data = json.load(sys.stdin)
for acc in data.get("account_details", []):
    for s in acc.get("stream_detail", []):
        if s["name"] == sys.argv[1]:
            print(s["state"]["last_seq"]); sys.exit()
print("missing")' "$1"
}
# num_pending, num_ack_pending of a consumer, or stream messages: jsz_get stream [consumer]
jsz_get() {
  jsz | python3 -c '
import json, sys
stream, consumer = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
data = json.load(sys.stdin)
for acc in data.get("account_details", []):
    for s in acc.get("stream_detail", []):
        if s["name"] != stream:
            continue
        if consumer is None:
            print(s["state"]["messages"]); sys.exit()
        for c in s.get("consumer_detail", []) or []:
            if c["name"] == consumer:
                print(c["num_pending"], c["num_ack_pending"]); sys.exit()
print("missing")' "$@"
}

container() { "${compose[@]}" ps -q "$1"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$(container "$1")"; }
wait_healthy() { # timeout services…
  local deadline=$((SECONDS + $1)) s
  shift
  for s in "$@"; do
    until [[ $(health "$s" 2>/dev/null) == healthy ]]; do
      ((SECONDS < deadline)) || die "$s is not healthy: $(health "$s" 2>/dev/null)"
      sleep 1
    done
  done
}
# What the PACS received: one line per object, "<modality> <study UID> <SOP instance UID>".
pacs_objects() {
  "$repo/.venv/bin/python" - "$pacs_dir" <<'PY'
import os, sys, pydicom
for name in sorted(os.listdir(sys.argv[1])):
    try:
        d = pydicom.dcmread(os.path.join(sys.argv[1], name), stop_before_pixels=True)
    except Exception:
        continue  # a file storescp is still writing
    print(d.Modality, d.StudyInstanceUID, d.SOPInstanceUID)
PY
}
wait_exported() { # study timeout -> seconds waited, once the SEG and the SR of the study are in
  local study=$1 deadline=$((SECONDS + $2)) start=$SECONDS objects
  while objects=$(pacs_objects); ! grep -q "^SEG $study " <<<"$objects" || ! grep -q "^SR $study " <<<"$objects"; do
    ((SECONDS < deadline)) || die "the PACS has no SEG and SR of study $study after $2 s: $(cut -d' ' -f1 <<<"$objects" | sort | uniq -c | xargs)"
    sleep 1
  done
  echo $((SECONDS - start))
}
wait_result() { # series timeout -> seconds waited
  local series=$1 deadline=$((SECONDS + $2)) start=$SECONDS
  until [[ $(s3_status "results/$series/$model_ref/summary.json") == 200 ]]; do
    ((SECONDS < deadline)) || die "no result for series $series after $2 s"
    sleep 1
  done
  echo $((SECONDS - start))
}

# ------------------------------------------------------------------------- build
if [[ -z ${RADFLOW_SMOKE_SKIP_BUILD:-} ]]; then
  log "building images (docker/build-local.sh)"
  docker/build-local.sh
fi
[[ -x $radflow ]] || die "$radflow is missing: run docker/build-local.sh"
for image in listener preprocessor inferer exporter model-fetch; do
  size=$(docker image inspect -f '{{.Size}}' "radflow-local/$image:$version") || die "image radflow-local/$image:$version is missing"
  record "image_bytes.$image" "$size"
done
record "image_bytes.nats" "$(docker image inspect -f '{{.Size}}' "radflow-local/nats:2.15.1")"
record "image_bytes.s3-dev" "$(docker image inspect -f '{{.Size}}' radflow-local/s3-dev:4.48)"

# ------------------------------------------------------------------------ start
log "starting the PACS (storescp, $pacs_ae on port $pacs_port)"
command -v storescp >/dev/null || die "DCMTK's storescp is needed (apt-get install dcmtk)"
storescp -aet "$pacs_ae" -od "$pacs_dir" "$pacs_port" >"$work/storescp.log" 2>&1 &
pacs_pid=$!
sleep 0.5
kill -0 "$pacs_pid" 2>/dev/null || die "storescp did not start: $(cat "$work/storescp.log")"

log "starting the stack"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
started=$SECONDS
"${compose[@]}" up -d --no-build
wait_healthy 180 nats s3 listener preprocessor inferer exporter
record "stack_up_seconds" "$((SECONDS - started))"
log "stack healthy after $((SECONDS - started)) s"
for s in listener preprocessor inferer exporter; do
  docker inspect -f '{{.Config.User}}' "$(container "$s")" | grep -q '^10001' || die "$s does not run as user 10001"
  [[ $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$(container "$s")") == true ]] || die "$s root file system is writable"
done

# ------------------------------------------------------------- NATS access
log "NATS: TLS and user/password (nats-certs)"
python3 - <<'PY' || die "NATS takes cleartext clients"
import json, socket
s = socket.create_connection(("127.0.0.1", 4222), timeout=5)
info = json.loads(s.recv(65536).decode().split(" ", 1)[1])
assert info.get("tls_required") is True and info.get("auth_required") is True, info
PY
connz=$(curl -sf "http://127.0.0.1:8222/connz?auth=true&limit=1024") || die "no /connz"
python3 - "$connz" <<'PY' || die "a radflow connection to NATS is not TLS as user radflow"
import json, sys
conns = [c for c in json.loads(sys.argv[1]).get("connections", []) if c.get("name", "").startswith("radflow")]
names = sorted({c["name"] for c in conns})
assert len(names) >= 4, f"radflow clients: {names}"
bad = [c for c in conns if not c.get("tls_version") or c.get("authorized_user") != "radflow"]
assert not bad, bad
print(f"{len(conns)} connections of {', '.join(names)}: TLS {conns[0]['tls_version']}, user radflow")
PY
nats_id=$(container nats)
docker cp "$nats_id:/etc/nats/tls/ca.crt" "$work/nats-ca.crt" >/dev/null
docker cp "$nats_id:/etc/nats/tls/nats-password" "$work/nats-password" >/dev/null
nats_tls=(--nats-url tls://127.0.0.1:4222 --nats-tls-ca "$work/nats-ca.crt" --nats-user radflow
  --nats-password-file "$work/nats-password" --nats-monitor-url http://127.0.0.1:8222)
"$radflow" status "${nats_tls[@]}" --json >"$work/status.json" 2>"$work/status.log" \
  || die "radflow status over TLS from the host failed: $(tail -n 5 "$work/status.log")"
# Without the CA, or in the clear: refused, with the certificate error.
for url in tls://127.0.0.1:4222 nats://127.0.0.1:4222; do
  if timeout 30 "$radflow" status --nats-url "$url" --nats-user radflow --nats-password-file "$work/nats-password" \
    --nats-monitor-url http://127.0.0.1:8222 --json >"$work/refused.log" 2>&1; then
    die "radflow status reached NATS at $url without the CA"
  fi
  grep -q UnknownIssuer "$work/refused.log" || die "no certificate error for $url: $(tail -n 3 "$work/refused.log")"
done
record "nats_access" '"TLS required, radflow clients TLS as user radflow, host client over TLS with the CA, refused without it"'

# -------------------------------------------------------------- 1. cold starts
# Process start (the container's StartedAt) to the first 200 from /readyz, polled
# from the host every 20 ms; three restarts per component, the median is recorded.
cold_start() { # service port -> milliseconds
  local id
  id=$(container "$1")
  docker stop -t 30 "$id" >/dev/null
  docker start "$id" >/dev/null
  local deadline=$((SECONDS + 120))
  until curl -sf -o /dev/null "http://127.0.0.1:$2/readyz"; do
    ((SECONDS < deadline)) || die "$1 not ready after restart"
    sleep 0.02
  done
  local ready_ns started
  ready_ns=$(date +%s%N)
  started=$(docker inspect -f '{{.State.StartedAt}}' "$id")
  python3 -c '
import sys, datetime
started, ready_ns = sys.argv[1], int(sys.argv[2])
date, frac = started.rstrip("Z").split(".")
t = datetime.datetime.strptime(date, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
t_ns = int(t) * 10**9 + int((frac + "000000000")[:9])
print(round((ready_ns - t_ns) / 1e6))' "$started" "$ready_ns"
}
for pair in listener:8081 preprocessor:8082 inferer:8083 exporter:8085; do
  s=${pair%%:*}
  port=${pair#*:}
  runs=()
  for _ in 1 2 3; do runs+=("$(cold_start "$s" "$port")"); done
  median=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n 2p)
  record "cold_start_ms.$s" "{\"median\": $median, \"runs\": [$(IFS=,; echo "${runs[*]}")]}"
  log "cold start $s: ${runs[*]} ms (median $median)"
done
wait_healthy 60 listener preprocessor inferer exporter

# ---------------------------------------------------------- 2. model fetcher
log "model fetcher: fetch and verify from S3"
model_sha=$(sha256sum models/demo-tissue.onnx | cut -d' ' -f1)
[[ $(s3 PUT models/demo-tissue.onnx --upload-file models/demo-tissue.onnx -o /dev/null -w '%{http_code}') == 200 ]] \
  || die "cannot upload the model to S3"
fetch() { # sha256 -> exit status of the fetcher
  cat >"$work/models.toml" <<TOML
[[model]]
name = "demo-file"
version = "1.0.0"
file = "/models/demo-tissue.onnx"
sha256 = "$1"
TOML
  chmod 0644 "$work/models.toml"
  docker run --rm --network "${project}_default" --read-only --cap-drop ALL \
    --security-opt no-new-privileges:true \
    -v "$work/models.toml:/etc/radflow/models.toml:ro" -v "${project}_models-test:/models" \
    -e RADFLOW_MODEL_SOURCE=s3://radflow/models -e AWS_ENDPOINT_URL=http://s3:9000 \
    -e AWS_REGION=us-east-1 -e AWS_ACCESS_KEY_ID="$s3_key" -e AWS_SECRET_ACCESS_KEY="$s3_secret" \
    "radflow-local/model-fetch:$version" >"$work/fetch.log" 2>&1
}
docker volume create "${project}_models-test" >/dev/null
docker run --rm -v "${project}_models-test:/models" --user 0 --entrypoint chown \
  "radflow-local/model-fetch:$version" 10001:10001 /models
fetch "$model_sha" || { cat "$work/fetch.log" >&2; die "the fetcher refused the right model"; }
grep -q "fetched and verified" "$work/fetch.log" || die "the fetcher did not fetch: $(cat "$work/fetch.log")"
fetch "$model_sha" && grep -q "in place and verified" "$work/fetch.log" || die "the fetcher did not keep the verified file"
docker run --rm -v "${project}_models-test:/models" --user 0 --entrypoint rm \
  "radflow-local/model-fetch:$version" -f /models/demo-tissue.onnx
set +e
fetch "0000000000000000000000000000000000000000000000000000000000000000"
rc=$?
set -e
((rc == 5)) && grep -q "digest mismatch" "$work/fetch.log" || die "the fetcher accepted a wrong digest (exit $rc)"
record "model_fetch" '"fetched, kept when verified, refused on digest mismatch"'

# ---------------------------------------------------------- 3. first study
log "study 1: synth and send"
"$radflow" synth --out "$work/study1" --seed 11 >/dev/null
series1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["series_uid"])' "$work/study1/truth.json")
sent=$SECONDS
"$radflow" send --to 127.0.0.1:11112 "$work/study1" >"$work/send1.log" 2>&1 || { cat "$work/send1.log" >&2; die "radflow send failed"; }
waited=$(wait_result "$series1" 300)
record "study1_seconds_send_to_result" "$((SECONDS - sent))"
log "study 1: result after $((SECONDS - sent)) s from the first C-STORE"
s3 GET "results/$series1/$model_ref/summary.json" -o "$work/summary1.json"
python3 - "$work/summary1.json" "$work/study1/truth.json" <<'PY' || die "study 1 summary does not match the phantom"
import json, sys
summary, truth = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
text = json.dumps(summary)
assert truth["series_uid"] in text, "summary names another series"
assert "soft_tissue" in text and "bone" in text, "summary has no label volumes"
PY
for f in labels.nii.gz preview.png; do
  [[ $(s3_status "results/$series1/$model_ref/$f") == 200 ]] || die "results/$series1/$model_ref/$f is missing"
done
study1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["study_uid"])' "$work/study1/truth.json")
exported=$(wait_exported "$study1" 120)
record "study1_seconds_result_to_pacs" "$exported"
log "study 1: SEG and SR at the PACS ${exported} s after the result"

# ------------------------------- 3b. 64-character UIDs and a real vendor file
log "study 3: 64-character UIDs and a vendor CT file"
"$radflow" synth --out "$work/study3" --size 128 --slices 40 --long-uids --seed 13 >/dev/null
vendor=$("$repo/.venv/bin/python" -c 'import pydicom.data; print(pydicom.data.get_testdata_file("CT_small.dcm"))')
cp "$vendor" "$work/study3/vendor-ct.dcm"
read -r study3 series3 < <(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(t["study_uid"], t["series_uid"])' "$work/study3/truth.json")
((${#series3} == 64)) || die "synth --long-uids wrote a series UID of ${#series3} characters"
"$radflow" send --to 127.0.0.1:11112 "$work/study3" >"$work/send3.log" 2>&1 || { cat "$work/send3.log" >&2; die "radflow send of long UIDs and the vendor file failed"; }
wait_result "$series3" 300 >/dev/null
stored=$(s3_list "dicom/$study3/$series3/" | grep -c '\.dcm$' || true)
[[ $stored == 40 ]] || die "S3 holds $stored of the 40 instances with 64-character UIDs"
longest=$(s3_list "dicom/$study3/$series3/" | awk '{ print length }' | sort -n | tail -n1)
read -r vstudy vseries vsop < <("$repo/.venv/bin/python" -c 'import sys, pydicom; d = pydicom.dcmread(sys.argv[1]); print(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID)' "$vendor")
[[ $(s3_status "dicom/$vstudy/$vseries/$vsop.dcm") == 200 ]] || die "the vendor CT file is not in S3"
record "long_uids" "{\"instances\": $stored, \"longest_key\": $longest, \"vendor_file_stored\": true}"
log "study 3: 40 instances under keys of up to $longest characters, the vendor CT file, and the result are in S3"

# ------------------------------------------- 4. second study, inferer killed
log "study 2: send, kill the inferer while it holds the job"
"$radflow" synth --out "$work/study2" --seed 12 >/dev/null
series2=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["series_uid"])' "$work/study2/truth.json")
inferer=$(container inferer)
restarts_before=$(docker inspect -f '{{.RestartCount}}' "$inferer")
sent=$SECONDS
"$radflow" send --to 127.0.0.1:11112 "$work/study2" >"$work/send2.log" 2>&1 || { cat "$work/send2.log" >&2; die "radflow send failed"; }
deadline=$((SECONDS + 300))
until read -r _ ack_pending < <(jsz_get RADFLOW_JOBS inferer-demo-tissue) && [[ ${ack_pending:-0} =~ ^[1-9] ]]; do
  ((SECONDS < deadline)) || die "the inferer never took the job of study 2"
  [[ $(s3_status "results/$series2/$model_ref/summary.json") != 200 ]] || die "study 2 finished before the inferer could be killed"
  sleep 0.1
done
kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$inferer")"
killed_at=$SECONDS
log "inferer killed while holding the job"
[[ $(s3_status "results/$series2/$model_ref/summary.json") != 200 ]] || die "the result existed before the kill: nothing was interrupted"
record "kill.seconds_after_send" "$((killed_at - sent))"
wait_healthy 180 inferer
restarts_after=$(docker inspect -f '{{.RestartCount}}' "$inferer")
((restarts_after > restarts_before)) || die "Docker did not restart the inferer"
log "inferer restarted by Docker (restart count $restarts_after)"
wait_result "$series2" 400 >/dev/null
record "kill.seconds_kill_to_result" "$((SECONDS - killed_at))"
log "study 2: result $((SECONDS - killed_at)) s after the kill"

# Once: every event id is derived from the series and model@version, so a redone job
# overwrites its objects and its event is dropped as a duplicate.
study2=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["study_uid"])' "$work/study2/truth.json")
wait_exported "$study2" 120 >/dev/null
wait_exported "$study3" 120 >/dev/null
sleep 3
results_msgs=$(jsz_get RADFLOW_RESULTS)
dlq_msgs=$(jsz_get RADFLOW_DLQ)
read -r jobs_pending jobs_ack_pending < <(jsz_get RADFLOW_JOBS inferer-demo-tissue)
export_jobs=$(jsz_last_seq RADFLOW_EXPORTS)
read -r exports_pending exports_ack_pending < <(jsz_get RADFLOW_EXPORTS exporter)
record "results_stream_messages" "$results_msgs"
# Three series with results (studies 1, 2 and 3); the single vendor CT slice is too
# few for a volume and gets none.
[[ $results_msgs == 3 ]] || die "RADFLOW_RESULTS holds $results_msgs events for 3 series"
[[ $dlq_msgs == 0 || $dlq_msgs == missing ]] || die "$dlq_msgs messages were dead-lettered"
[[ $jobs_pending == 0 && $jobs_ack_pending == 0 ]] || die "jobs left: pending $jobs_pending, unacknowledged $jobs_ack_pending"
# One export job per result, and at the PACS one SEG and one SR per result (an object
# sent twice would replace itself: its UIDs are derived from the result).
[[ $export_jobs == 3 ]] || die "RADFLOW_EXPORTS received $export_jobs export jobs for 3 results"
[[ $exports_pending == 0 && $exports_ack_pending == 0 ]] || die "export jobs left: pending $exports_pending, unacknowledged $exports_ack_pending"
pacs_objects >"$work/pacs.txt"
for modality in SEG SR; do
  n=$(awk -v m="$modality" '$1 == m { print $3 }' "$work/pacs.txt" | sort -u | wc -l)
  [[ $n == 3 ]] || die "the PACS holds $n distinct $modality objects for 3 results: $(cat "$work/pacs.txt")"
done
sent=$(curl -sf http://127.0.0.1:8085/metrics | awk '/^radflow_exports_total\{.*destination="smoke-pacs".*outcome="sent"/ { print $2 }')
record "exports" "{\"jobs\": $export_jobs, \"objects_at_pacs\": $(wc -l <"$work/pacs.txt"), \"sent_metric\": ${sent:-0}}"
log "exports: $export_jobs jobs, one SEG and one SR per result at the PACS, radflow_exports_total sent = ${sent:-0}"
keys=$(s3_list "results/$series2/")
count=$(grep -c 'summary.json$' <<<"$keys" || true)
[[ $count == 1 ]] || die "results/$series2 holds $count summaries: $keys"
log "result of study 2 arrived once: 1 summary, RADFLOW_RESULTS = $results_msgs events for 3 series, no dead letter"

# The phantom's patient name and ID must appear in no log line.
"${compose[@]}" logs --no-color >"$work/logs.txt" 2>&1
if grep -E 'PHANTOM\^RADFLOW|RADFLOW-PHANTOM' "$work/logs.txt" >/dev/null; then
  die "patient demographics in the container logs"
fi
log "no patient name or ID in $(wc -l <"$work/logs.txt") log lines"
record "passed" true
