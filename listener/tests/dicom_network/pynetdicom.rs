//! pynetdicom as the sender: per-context refusal reasons.

use radflow_listener::scp::ScpConfig;

use crate::helpers::*;

const SCRIPT: &str = r#"
import json, sys
from pydicom import dcmread
from pynetdicom import AE

port, path = int(sys.argv[1]), sys.argv[2]
ae = AE(ae_title="PYSCU")
# 1: Patient Root Q/R FIND, not a storage class
ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1", ["1.2.840.10008.1.2.1"])
# 3: CT Image Storage in MPEG2 only, a syntax we do not take
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.100"])
# 5: CT Image Storage, explicit VR little endian
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
# 7: Storage Commitment Push, which has "Storage" in its name but is no C-STORE class
ae.add_requested_context("1.2.840.10008.1.20.1", ["1.2.840.10008.1.2.1"])
assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
out = {"established": assoc.is_established, "contexts": {}}
if assoc.is_established:
    for cx in assoc.accepted_contexts + assoc.rejected_contexts:
        out["contexts"][str(cx.context_id)] = cx.result
    status = assoc.send_c_store(dcmread(path))
    out["store_status"] = int(status.Status) if "Status" in status else None
    out["still_established"] = assoc.is_established
    assoc.release()
    out["released"] = assoc.is_released
print(json.dumps(out))
"#;

/// Runs a pynetdicom script (written into `dir` as `name`) with `args`; returns the
/// JSON report it prints last.
async fn run_script(dir: &TempDir, name: &str, script: &str, args: &[String]) -> serde_json::Value {
    let path = dir.path(name);
    std::fs::write(&path, script).unwrap();
    let mut all = vec![path.to_str().unwrap()];
    all.extend(args.iter().map(String::as_str));
    let out = run_tool(&python_with_pynetdicom(), &all).await;
    assert!(out.status.success(), "script failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_contexts_are_refused_and_ct_still_accepted() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("pynetdicom");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let report = run_script(
        &dir,
        "scu.py",
        SCRIPT,
        &[server.port(), path.to_str().unwrap().to_string()],
    )
    .await;

    assert_eq!(report["established"], true);
    // 0 acceptance, 3 abstract syntax not supported, 4 transfer syntaxes not supported.
    assert_eq!(
        report["contexts"],
        serde_json::json!({"1": 3, "3": 4, "5": 0, "7": 3}),
        "{report}"
    );
    assert_eq!(report["store_status"], 0, "{report}");
    assert_eq!(report["still_established"], true);
    assert_eq!(report["released"], true);

    let received = server.sink.take();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].facts.sop_instance_uid, ct.instance);
    assert_eq!(received[0].calling_ae, "PYSCU");
    assert_eq!(received[0].transfer_syntax, EXPLICIT_LE);
}

/// Compresses files with pydicom (JPEG 2000 through pylibjpeg-openjpeg), then sends
/// groups of files on concurrent associations, each file in its own transfer syntax.
const CONCURRENT: &str = r#"
import json, sys, threading
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEG2000
from pynetdicom import AE

port = int(sys.argv[1])
j2k_in, j2k_lossless, j2k_lossy = sys.argv[2:5]
groups = [g.split(",") for g in sys.argv[5:]]

ds = dcmread(j2k_in)
ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
ds.save_as(j2k_lossless, enforce_file_format=True)
ds = dcmread(j2k_in)
ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
ds.save_as(j2k_lossy, enforce_file_format=True)

results, lock = {}, threading.Lock()
barrier = threading.Barrier(len(groups))

def send(n, files):
    ae = AE(ae_title=f"PYCONC{n}")
    datasets = [dcmread(f) for f in files]
    for d in datasets:
        ae.add_requested_context(d.SOPClassUID, [d.file_meta.TransferSyntaxUID])
    barrier.wait()
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
    statuses = {}
    established = assoc.is_established
    if established:
        for f, d in zip(files, datasets):
            s = assoc.send_c_store(d)
            statuses[f] = int(s.Status) if "Status" in s else None
        assoc.release()
    with lock:
        results[n] = {"established": established, "statuses": statuses}

threads = [threading.Thread(target=send, args=(n, g)) for n, g in enumerate(groups)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_associations_in_every_compressed_syntax() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("concurrent");
    let study = new_uid();
    let series = new_uid();

    // Inputs: explicit VR; JPEG process 14 (dcmcjpeg +el, which storescu cannot
    // propose); a source for the JPEG 2000 files that the script writes.
    let mut sent: Vec<(std::path::PathBuf, &str)> = Vec::new();
    let mut n = 0;
    let mut next_ct = || {
        n += 1;
        Ct::new(&study, &series, n, 128)
    };
    for _ in 0..8 {
        let ct = next_ct();
        let path = dir.path(&format!("ex{}.dcm", ct.number));
        write_ct(&path, &ct);
        sent.push((path, EXPLICIT_LE));
    }
    for _ in 0..4 {
        let ct = next_ct();
        let source = dir.path_str(&format!("src{}.dcm", ct.number));
        write_ct(std::path::Path::new(&source), &ct);
        let path = dir.path(&format!("p14-{}.dcm", ct.number));
        convert("dcmcjpeg", &["+el", &source, path.to_str().unwrap()]).await;
        assert_eq!(transfer_syntax_of(&path), "1.2.840.10008.1.2.4.57");
        sent.push((path, "1.2.840.10008.1.2.4.57"));
    }
    let j2k_source = dir.path("j2k-src.dcm");
    write_ct(&j2k_source, &next_ct());
    let (j2k_lossless, j2k_lossy) = (dir.path("j2k.dcm"), dir.path("j2k-lossy.dcm"));

    // Four associations: the J2K files on one, the rest spread round robin.
    let mut groups: Vec<Vec<String>> = vec![Vec::new(); 4];
    for (i, (path, _)) in sent.iter().enumerate() {
        groups[i % 3].push(path.to_str().unwrap().to_string());
    }
    groups[3].push(j2k_lossless.to_str().unwrap().to_string());
    groups[3].push(j2k_lossy.to_str().unwrap().to_string());
    sent.push((j2k_lossless.clone(), "1.2.840.10008.1.2.4.90"));
    sent.push((j2k_lossy.clone(), "1.2.840.10008.1.2.4.91"));

    let mut args = vec![
        server.port(),
        j2k_source.to_str().unwrap().to_string(),
        j2k_lossless.to_str().unwrap().to_string(),
        j2k_lossy.to_str().unwrap().to_string(),
    ];
    args.extend(groups.iter().map(|g| g.join(",")));
    let report = run_script(&dir, "concurrent.py", CONCURRENT, &args).await;
    for n in 0..4 {
        let r = &report[n.to_string()];
        assert_eq!(r["established"], true, "{report}");
        for status in r["statuses"].as_object().unwrap().values() {
            assert_eq!(status, 0, "{report}");
        }
    }

    let received = server.sink.take();
    assert_eq!(received.len(), sent.len());
    for (path, ts) in &sent {
        let uid = dicom_object::open_file(path)
            .unwrap()
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_string();
        let r = find(&received, &uid);
        assert_stored_exactly(r, path, ts, &r.calling_ae.clone());
        assert!(r.calling_ae.starts_with("PYCONC"));
    }
    assert_eq!(server.wait_releases(4).await.len(), 4);
}

/// Writes one CT file per newer encapsulated syntax (HTJ2K lossless coded by OpenJPH's
/// `ojph_compress`, Encapsulated Uncompressed, Deflated Image Frame Compression), then
/// sends them as they are on one association that also proposes the other HTJ2K and
/// JPEG 2000 Part 2 syntaxes.
const NEWER_SYNTAXES: &str = r#"
import json, os, subprocess, sys, tempfile, zlib
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pynetdicom import AE, _config

# Send the files' bytes without decoding them: pydicom cannot encode every syntax here.
_config.STORE_SEND_CHUNKED_DATASET = True
port = int(sys.argv[1])
(ht_in, ht_out), (eu_in, eu_out), (df_in, df_out) = [a.split(",") for a in sys.argv[2:5]]
HTJ2K, EU, DEFLATED_FRAMES = (
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.8.1")

def write(ds, frame, ts, out):
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    # pydicom 3.0 has no Deflated Image Frame Compression: write the file as
    # Encapsulated Uncompressed, whose UID has the same padded length (22 bytes), then
    # rename the syntax.
    ds.file_meta.TransferSyntaxUID = EU if ts == DEFLATED_FRAMES else ts
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    if ts == DEFLATED_FRAMES:
        data = open(out, "rb").read()
        padded = ts.encode() + b"\0"
        assert len(padded) == len(EU) and data.count(EU.encode()) == 1
        open(out, "wb").write(data.replace(EU.encode(), padded))

ds = dcmread(ht_in)
with tempfile.TemporaryDirectory() as tmp:
    raw, j2c = os.path.join(tmp, "in.yuv"), os.path.join(tmp, "out.j2c")
    ds.pixel_array.astype("<u2").tofile(raw)
    subprocess.run(["ojph_compress", "-i", raw, "-o", j2c, "-reversible", "true",
                    "-dims", f"{{{ds.Columns},{ds.Rows}}}", "-num_comps", "1",
                    "-signed", "false", "-bit_depth", str(ds.BitsStored),
                    "-downsamp", "{1,1}"], check=True, capture_output=True)
    frame = open(j2c, "rb").read()
    assert frame[:2] == b"\xff\x4f", "a JPEG 2000 codestream"
write(ds, frame, HTJ2K, ht_out)
ds = dcmread(eu_in)
write(ds, ds.PixelData, EU, eu_out)
ds = dcmread(df_in)
deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
write(ds, deflater.compress(ds.PixelData) + deflater.flush(), DEFLATED_FRAMES, df_out)

ae = AE(ae_title="PYNEWTS")
ct = "1.2.840.10008.5.1.4.1.1.2"
for ts in [HTJ2K, EU, DEFLATED_FRAMES, "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
           "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"]:
    ae.add_requested_context(ct, [ts])
assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
out = {"established": assoc.is_established, "accepted": [], "statuses": {}}
if assoc.is_established:
    out["accepted"] = sorted(cx.transfer_syntax[0] for cx in assoc.accepted_contexts)
    for f in (ht_out, eu_out, df_out):
        s = assoc.send_c_store(f)
        out["statuses"][f] = int(s.Status) if "Status" in s else None
    assoc.release()
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htj2k_and_newer_encapsulated_syntaxes_are_accepted_and_stored_exactly() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("newer-syntaxes");
    let (study, series) = (new_uid(), new_uid());
    let mut pairs = Vec::new();
    for (n, name) in ["htj2k", "eu", "deflated-frames"].into_iter().enumerate() {
        let source = dir.path(&format!("{name}-src.dcm"));
        write_ct(&source, &Ct::new(&study, &series, n as u32 + 1, 64));
        pairs.push((source, dir.path(&format!("{name}.dcm"))));
    }
    let mut args = vec![server.port()];
    args.extend(
        pairs
            .iter()
            .map(|(s, o)| format!("{},{}", s.display(), o.display())),
    );
    let report = run_script(&dir, "newer.py", NEWER_SYNTAXES, &args).await;
    assert_eq!(report["established"], true, "{report}");
    let mut proposed = vec![
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.1.98",
        "1.2.840.10008.1.2.8.1",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
    ];
    proposed.sort();
    assert_eq!(report["accepted"], serde_json::json!(proposed), "{report}");
    for status in report["statuses"].as_object().unwrap().values() {
        assert_eq!(status, 0, "{report}");
    }

    let received = server.sink.take();
    assert_eq!(received.len(), 3);
    for ((_, sent), ts) in pairs.iter().zip([
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.1.98",
        "1.2.840.10008.1.2.8.1",
    ]) {
        assert_eq!(transfer_syntax_of(sent), ts);
        let uid = dicom_object::open_file(sent)
            .unwrap()
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_string();
        assert_stored_exactly(find(&received, &uid), sent, ts, "PYNEWTS");
    }
}

/// Proposes CT Image Storage in one syntax per context and reports each context's
/// result.
const ONE_SYNTAX_PER_CONTEXT: &str = r#"
import json, sys
from pynetdicom import AE

port, syntaxes = int(sys.argv[1]), sys.argv[2:]
ae = AE(ae_title="PYLOSSLESS")
for ts in syntaxes:
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ts])
assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
out = {"established": assoc.is_established, "results": {}}
if assoc.is_established:
    for cx in assoc.accepted_contexts + assoc.rejected_contexts:
        out["results"][cx.transfer_syntax[0]] = cx.result
    assoc.release()
print(json.dumps(out))
"#;

/// A site that accepts lossless syntaxes only refuses the lossy ones per context, with
/// "transfer syntaxes not supported", so the sender can send the original instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossless_only_listener_refuses_lossy_contexts() {
    let syntaxes =
        radflow_listener::sop_classes::transfer_syntaxes_from(&["lossless".into()]).unwrap();
    let server = TestServer::start(ScpConfig {
        transfer_syntaxes: syntaxes,
        ..ScpConfig::default()
    })
    .await;
    let dir = TempDir::new("lossless-only");
    let lossy = [
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.203",
    ];
    let lossless = [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.201",
    ];
    let mut args = vec![server.port()];
    args.extend(lossy.iter().chain(&lossless).map(|s| s.to_string()));
    let report = run_script(&dir, "lossless.py", ONE_SYNTAX_PER_CONTEXT, &args).await;
    assert_eq!(report["established"], true, "{report}");
    // 0 acceptance, 4 transfer syntaxes not supported.
    for ts in lossy {
        assert_eq!(report["results"][ts], 4, "{ts}: {report}");
    }
    for ts in lossless {
        assert_eq!(report["results"][ts], 0, "{ts}: {report}");
    }
}
