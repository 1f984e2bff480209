//! The listener as a process, with real peers: SIGKILL in the middle of a 300-instance
//! association and during the group-committed batches of four, and SIGTERM while a
//! sender is still sending.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use radflow_shared::bus::{Bus, INSTANCES, NatsBus, NatsOptions, SERIES};
use radflow_shared::events::{self, InstanceStored, SeriesReady};
use radflow_shared::testing::NatsServer;

/// Sends files on one association, printing `OK <SOP Instance UID>` for each Success
/// as soon as it arrives; `--pause` waits between instances.
const SENDER: &str = r#"
import sys, time
from pydicom import dcmread
from pynetdicom import AE
port, pause, files = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ae = AE(ae_title="PROCSCU")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
if not assoc.is_established:
    print("NOT ESTABLISHED", flush=True)
    sys.exit(2)
for f in files:
    ds = dcmread(f)
    if not assoc.is_established:
        break
    status = assoc.send_c_store(ds)
    if status and status.get("Status") == 0:
        print("OK", ds.SOPInstanceUID, flush=True)
    time.sleep(pause)
if assoc.is_established:
    assoc.release()
    print("RELEASED", flush=True)
"#;

fn spawn_sender(
    dir: &Path,
    port: u16,
    pause: f64,
    files: &[PathBuf],
) -> (std::process::Child, PathBuf) {
    spawn_named_sender(dir, "sender", port, pause, files)
}

fn spawn_named_sender(
    dir: &Path,
    name: &str,
    port: u16,
    pause: f64,
    files: &[PathBuf],
) -> (std::process::Child, PathBuf) {
    let script = dir.join("sender.py");
    std::fs::write(&script, SENDER).unwrap();
    let out = dir.join(format!("{name}.out"));
    let child = std::process::Command::new(python())
        .arg(&script)
        .arg(port.to_string())
        .arg(pause.to_string())
        .args(files)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .expect("python with pynetdicom");
    (child, out)
}

fn acknowledged(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("OK ").map(str::to_owned))
        .collect()
}

fn listener(
    nats: &NatsServer,
    store: &Path,
    dicom: u16,
    http: u16,
    log_dir: &Path,
    name: &str,
) -> Proc {
    let mut cmd = radflow();
    cmd.args(["listener", "--nats-url", &nats.url()])
        .arg("--store-url")
        .arg(format!("file://{}", store.display()))
        .args(["--store-journal", "true"])
        .args([
            "--dicom-port",
            &dicom.to_string(),
            "--http-port",
            &http.to_string(),
        ])
        .args([
            "--series-quiet-secs",
            "4",
            "--series-release-quiet-secs",
            "1",
        ]);
    let mut p = Proc::spawn(name, cmd, log_dir);
    wait_port(dicom, &mut [&mut p]);
    p
}

fn ready_events(nats: &NatsServer, series: &str) -> Vec<SeriesReady> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = NatsBus::connect(&NatsOptions {
            url: nats.url(),
            name: "e2e-reader".into(),
            replicas: 1,
            ..Default::default()
        })
        .await
        .expect("NATS");
        bus.read(SERIES, 1, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| events::decode::<SeriesReady>(&m.payload).ok())
            .filter(|e| e.series_uid == series)
            .collect()
    })
}

/// A misspelt `--transfer-syntaxes` stops the listener at start, naming the option,
/// rather than leaving it to refuse every sender.
#[test]
fn an_unknown_transfer_syntax_stops_the_listener_at_start() {
    let t = TempDir::new("bad-syntax");
    let out = radflow()
        .args(["run", "--data", t.path().to_str().unwrap()])
        .args(["--dicom-port", &free_port().to_string()])
        .args(["--http-port", &free_port().to_string()])
        .args(["--transfer-syntaxes", "lossless,jpeg-lossless"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--transfer-syntaxes") && stderr.contains("\"jpeg-lossless\""),
        "{stderr}"
    );
}

#[test]
fn sigkill_mid_association_loses_no_acknowledged_instance() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("listener-kill");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 300, &["--seed", "11"]);
    let files = dicom_files(&series_dir);
    assert_eq!(files.len(), 300);
    let (dicom, http) = (free_port(), free_port());
    let mut first = listener(&nats, &store, dicom, http, work.path(), "listener-1");

    let (mut sender, out) = spawn_sender(work.path(), dicom, 0.0, &files);
    wait_for(
        "100 acknowledged instances",
        Duration::from_secs(120),
        || (acknowledged(&out).len() >= 100).then_some(()),
    );
    first.kill();
    let status = sender.wait().unwrap();
    let acked = acknowledged(&out);
    assert!(
        acked.len() < 300,
        "the association finished before the kill ({status})"
    );

    let series_store = store.join(format!("dicom/{}/{}", truth.study_uid, truth.series_uid));
    for uid in &acked {
        assert!(
            series_store.join(format!("{uid}.dcm")).is_file(),
            "acknowledged {uid} is not in the store"
        );
    }
    let stored = std::fs::read_dir(&series_store).unwrap().count();

    // A power cut could also lose store files written since the journal's last
    // checkpoint: remove them, as it would; the restart replays them from the journal.
    let journals = store.join(".journal");
    let journal_folders = || -> Vec<PathBuf> {
        std::fs::read_dir(&journals)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let killed = journal_folders();
    assert_eq!(killed.len(), 1, "{killed:?}");
    let uncovered = uncheckpointed_records(&killed[0]);
    for record in &uncovered {
        std::fs::remove_file(store.join(&record.key)).unwrap();
    }

    // After a restart the series becomes ready exactly once, with every acknowledged
    // instance in it.
    let _second = listener(&nats, &store, dicom, http, work.path(), "listener-2");
    let ready = wait_for("the series to be ready", Duration::from_secs(60), || {
        let r = ready_events(&nats, &truth.series_uid);
        (!r.is_empty()).then_some(r)
    });
    std::thread::sleep(Duration::from_secs(6));
    let again = ready_events(&nats, &truth.series_uid);
    assert_eq!(again.len(), 1, "{again:?}");
    let instances = ready[0].instances as usize;
    assert!(
        instances >= acked.len() && instances <= stored,
        "ready with {instances} instances; {} acknowledged, {stored} stored",
        acked.len()
    );
    for record in &uncovered {
        let key = &record.key;
        assert!(
            std::fs::read(store.join(key)).unwrap() == record.data,
            "{key}"
        );
    }
    assert!(
        !killed[0].exists(),
        "the killed listener's journal was replayed"
    );
    assert_eq!(journal_folders().len(), 1, "the new listener's journal");
}

/// A record of a journal folder newer than its checkpoint.
struct JournalRecord {
    key: String,
    data: Vec<u8>,
    /// The file that holds it and the offset of its header there.
    file: PathBuf,
    at: u64,
}

/// The records of a journal folder newer than its checkpoint. Reads the format
/// documented in `listener/src/journal.rs`: regions of 4 KiB + 4 MiB in `segment`, a
/// header at the start of each (magic, sequence, length, CRC, key) and the data 4 KiB
/// after it.
fn uncheckpointed_records(dir: &Path) -> Vec<JournalRecord> {
    const HEADER: u64 = 4096;
    const REGION: u64 = HEADER + (4 << 20);
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    let checkpoint = std::fs::read(dir.join("checkpoint")).unwrap();
    assert_eq!(&checkpoint[..8], b"RFJCKPT1");
    let covered = le64(&checkpoint[8..]);
    let path = dir.join("segment");
    let segment = std::fs::File::open(&path).unwrap();
    let regions = segment.metadata().unwrap().len().div_ceil(REGION);
    let mut out = Vec::new();
    for region in 0..regions {
        let at = region * REGION;
        let mut head = [0u8; HEADER as usize];
        let n = segment.read_at(&mut head, at).unwrap();
        if n < 34 || &head[..8] != b"RFJSLOT1" || le64(&head[8..]) <= covered {
            continue;
        }
        let len = le64(&head[16..]) as usize;
        let key_len = u16::from_le_bytes([head[28], head[29]]) as usize;
        let key = std::str::from_utf8(&head[30..30 + key_len])
            .unwrap()
            .to_owned();
        let mut data = vec![0u8; len];
        segment.read_exact_at(&mut data, at + HEADER).unwrap();
        out.push(JournalRecord {
            key,
            data,
            file: path.clone(),
            at,
        });
    }
    out
}

/// The SOP Instance UID of each file, read in one go with pydicom.
fn sop_uids(files: &[PathBuf]) -> HashMap<String, PathBuf> {
    let mut cmd = std::process::Command::new(python());
    cmd.args([
        "-c",
        "import sys\nfrom pydicom import dcmread\nfor f in sys.argv[1:]: print(dcmread(f, stop_before_pixels=True).SOPInstanceUID, f)",
    ])
    .args(files);
    let out = run_ok(cmd, "reading SOP Instance UIDs");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (uid, path) = l.split_once(' ').unwrap();
            (uid.to_owned(), PathBuf::from(path))
        })
        .collect()
}

/// The SOP Instance UIDs of every `InstanceStored` event on the bus.
fn stored_events(nats: &NatsServer) -> HashSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = NatsBus::connect(&NatsOptions {
            url: nats.url(),
            name: "e2e-reader".into(),
            replicas: 1,
            ..Default::default()
        })
        .await
        .expect("NATS");
        bus.read(INSTANCES, 1, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| events::decode::<InstanceStored>(&m.payload).ok())
            .map(|e| e.sop_instance_uid)
            .collect()
    })
}

/// Four associations share the journal's flushes; a SIGKILL lands in the middle of
/// their batches, some records written and not yet flushed, some flushed and not yet
/// answered. Then a power cut is played on top: every store file newer than the last
/// checkpoint is lost, and so is the data of every record whose sender heard no
/// Success (the cut came before its flush). Every instance that was answered Success
/// is still in the store after the restart, byte for byte, and has its event.
#[test]
fn sigkill_during_batches_of_four_associations_keeps_every_acknowledged_instance() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("listener-kill-batch");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 400, &["--seed", "17"]);
    let files = dicom_files(&series_dir);
    let by_uid = sop_uids(&files);
    let (dicom, http) = (free_port(), free_port());
    let mut first = listener(&nats, &store, dicom, http, work.path(), "listener-1");

    let mut senders: Vec<_> = (0..4)
        .map(|i| {
            let group: Vec<PathBuf> = files.iter().skip(i).step_by(4).cloned().collect();
            spawn_named_sender(work.path(), &format!("sender-{i}"), dicom, 0.0, &group)
        })
        .collect();
    let all_acked = |senders: &[(std::process::Child, PathBuf)]| -> Vec<String> {
        senders
            .iter()
            .flat_map(|(_, out)| acknowledged(out))
            .collect()
    };
    wait_for(
        "150 acknowledged instances",
        Duration::from_secs(120),
        || (all_acked(&senders).len() >= 150).then_some(()),
    );
    first.kill();
    for (child, _) in &mut senders {
        child.wait().unwrap();
    }
    let acked = all_acked(&senders);
    assert!(
        acked.len() < files.len(),
        "the senders finished before the kill"
    );

    let series_key = format!("dicom/{}/{}", truth.study_uid, truth.series_uid);
    let acked_keys: HashSet<String> = acked
        .iter()
        .map(|u| format!("{series_key}/{u}.dcm"))
        .collect();
    let killed: Vec<PathBuf> = std::fs::read_dir(store.join(".journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(killed.len(), 1, "{killed:?}");
    let uncovered = uncheckpointed_records(&killed[0]);
    assert!(
        !uncovered.is_empty(),
        "the kill came after a checkpoint of everything"
    );
    for record in &uncovered {
        let _ = std::fs::remove_file(store.join(&record.key));
        if !acked_keys.contains(&record.key) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&record.file)
                .unwrap();
            let garbage = vec![0xA5u8; record.data.len().clamp(1, 4096)];
            file.write_all_at(&garbage, record.at + 4096).unwrap();
        }
    }

    // The restart replays the journal (and removes it) before it takes associations;
    // its port is bound, and accepts into the backlog, before that.
    let _second = listener(&nats, &store, dicom, http, work.path(), "listener-2");
    wait_for(
        "the killed listener's journal to be replayed",
        Duration::from_secs(60),
        || (!killed[0].exists()).then_some(()),
    );
    let events = stored_events(&nats);
    for uid in &acked {
        let stored = std::fs::read(store.join(format!("{series_key}/{uid}.dcm")))
            .unwrap_or_else(|e| panic!("acknowledged {uid} is not in the store: {e}"));
        let sent = std::fs::read(&by_uid[uid]).unwrap();
        assert!(
            stored[dataset_offset(&stored)..] == sent[dataset_offset(&sent)..],
            "stored {uid} differs from what was sent"
        );
        assert!(
            events.contains(uid),
            "acknowledged {uid} has no InstanceStored event"
        );
    }
}

#[test]
fn sigterm_turns_readiness_off_and_lets_the_sender_finish() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("listener-term");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    synth(&series_dir, 32, 12, &["--seed", "5"]);
    let files = dicom_files(&series_dir);
    let (dicom, http) = (free_port(), free_port());
    let mut proc = listener(&nats, &store, dicom, http, work.path(), "listener");
    wait_for("/readyz 200", Duration::from_secs(30), || {
        http_get(http, "/readyz").filter(|(s, _)| *s == 200)
    });

    let (mut sender, out) = spawn_sender(work.path(), dicom, 0.25, &files);
    wait_for(
        "a first acknowledged instance",
        Duration::from_secs(30),
        || (!acknowledged(&out).is_empty()).then_some(()),
    );
    let signalled = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &proc.child.id().to_string()])
        .status()
        .unwrap();
    // Readiness goes false at once (503, or the HTTP port already closed).
    wait_for(
        "/readyz to turn false",
        Duration::from_secs(2),
        || match http_get(http, "/readyz") {
            Some((200, _)) => None,
            _ => Some(()),
        },
    );
    // The port closes to new associations…
    wait_for("the DICOM port to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", dicom)).err()
    });
    // …while the running one sends every file and releases.
    let status = sender.wait().unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "sender failed: {text}");
    assert_eq!(acknowledged(&out).len(), files.len(), "{text}");
    assert!(text.contains("RELEASED"), "{text}");
    let exit = wait_for("the listener to exit", Duration::from_secs(30), || {
        proc.child.try_wait().unwrap()
    });
    assert!(
        exit.success(),
        "listener exit {exit}; log:\n{}",
        proc.logs()
    );
    assert!(signalled.elapsed() < Duration::from_secs(25));
}

/// Byte offset of the dataset in a Part-10 file (after the File Meta group).
fn dataset_offset(file: &[u8]) -> usize {
    assert_eq!(&file[128..132], b"DICM", "not a Part-10 file");
    144 + u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize
}

#[test]
fn a_full_store_refuses_instances_and_keeps_every_acknowledged_one() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("listener-full");
    let store = work.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 512, 10, &["--seed", "13"]);
    let files = dicom_files(&series_dir);
    let (dicom, http) = (free_port(), free_port());
    // The store is a 3 MiB tmpfs that only the listener sees (its own mount namespace):
    // room for five of the ten 513 KiB instances.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "-rm",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=3m tmpfs "$0" && exec "$@""#,
    ])
    .arg(&store)
    .arg(env!("CARGO_BIN_EXE_radflow"))
    .args(["listener", "--nats-url", &nats.url()])
    .arg("--store-url")
    .arg(format!("file://{}", store.display()))
    .args([
        "--dicom-port",
        &dicom.to_string(),
        "--http-port",
        &http.to_string(),
    ])
    .env("RADFLOW_LOG_FORMAT", "json");
    let mut proc = Proc::spawn("listener", cmd, work.path());
    wait_port(dicom, &mut [&mut proc]);

    let (mut sender, out) = spawn_sender(work.path(), dicom, 0.0, &files);
    assert!(
        sender.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&out).unwrap()
    );
    let acked = acknowledged(&out);
    assert!(
        !acked.is_empty() && acked.len() < files.len(),
        "{} of {} acknowledged: the store should have filled up",
        acked.len(),
        files.len()
    );

    // What the listener's namespace holds: every acknowledged instance, whole, and
    // nothing else (no partial or staging file).
    let inside = PathBuf::from(format!("/proc/{}/root", proc.child.id()))
        .join(store.strip_prefix("/").unwrap())
        .join(format!("dicom/{}/{}", truth.study_uid, truth.series_uid));
    let mut names: Vec<String> = std::fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = acked.iter().map(|u| format!("{u}.dcm")).collect();
    expected.sort();
    assert_eq!(names, expected);
    for path in &files {
        let sent = std::fs::read(path).unwrap();
        let sop = dicom_sop_uid(path);
        if let Ok(stored) = std::fs::read(inside.join(format!("{sop}.dcm"))) {
            assert!(
                stored[dataset_offset(&stored)..] == sent[dataset_offset(&sent)..],
                "stored {sop} differs from what was sent"
            );
        }
    }
    let (_, metrics) = http_get(http, "/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"radflow_dicom_cstore_failures_total{status="0xA700"}"#),
        "{metrics}"
    );
    // Right after the failures, new associations are refused transiently (senders
    // come back later instead of filling the listener); once the failures are a few
    // seconds old, it takes associations again.
    let echo = || {
        dcmtk("echoscu")
            .args(["-aec", "RADFLOW", "127.0.0.1", &dicom.to_string()])
            .output()
            .unwrap()
    };
    let refused = echo();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Temporary Congestion"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    wait_for(
        "an association to be admitted again",
        Duration::from_secs(20),
        || echo().status.success().then_some(()),
    );
    proc.assert_running();
}

/// The SOP Instance UID recorded in a file's meta group.
fn dicom_sop_uid(path: &Path) -> String {
    let out = dcmtk("dcmdump")
        .args(["-s", "+P", "0002,0003"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('[').expect("a UID in dcmdump's output") + 1;
    let end = start + text[start..].find(']').unwrap();
    text[start..end].to_owned()
}

/// Writes a 256 MiB multi-frame CT (512 frames of 512×512, 16 bits) with pydicom.
const MULTIFRAME: &str = r#"
import sys
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
ds.SOPInstanceUID = generate_uid()
ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
ds.Modality = "CT"
ds.NumberOfFrames = 512
ds.Rows = ds.Columns = 512
ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
ds.PixelData = (np.arange(512 * 512 * 512, dtype=np.uint32) % 4093).astype(np.uint16).tobytes()
ds.save_as(sys.argv[1], enforce_file_format=True)
print(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
"#;

/// The peak resident set size of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[test]
fn a_256_mib_multi_frame_instance_streams_to_the_store_in_flat_memory() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("listener-large");
    let store = work.path().join("store");
    let file = work.path().join("multiframe.dcm");
    let script = work.path().join("multiframe.py");
    std::fs::write(&script, MULTIFRAME).unwrap();
    let mut cmd = std::process::Command::new(python());
    cmd.arg(&script).arg(&file);
    let out = run_ok(cmd, "writing the multi-frame instance");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let uids: Vec<&str> = text.split_whitespace().collect();
    let (study, series, sop) = (uids[0], uids[1], uids[2]);

    let (dicom, http) = (free_port(), free_port());
    let mut proc = listener(&nats, &store, dicom, http, work.path(), "listener");
    let before = peak_rss_kib(proc.child.id());
    let sent = dcmtk("storescu")
        .args(["-aec", "RADFLOW", "127.0.0.1", &dicom.to_string()])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let peak = peak_rss_kib(proc.child.id());

    let stored = std::fs::read(store.join(format!("dicom/{study}/{series}/{sop}.dcm"))).unwrap();
    let original = std::fs::read(&file).unwrap();
    assert!(stored.len() > 256 << 20);
    assert!(
        stored[dataset_offset(&stored)..] == original[dataset_offset(&original)..],
        "the stored multi-frame instance differs from what was sent"
    );
    // The instance never sat whole in memory: the listener grew by far less than it.
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "peak RSS grew from {before} KiB to {peak} KiB for a 256 MiB instance"
    );
    // A multi-frame instance without count hints is a complete series of one.
    let ready = wait_for("the series to be ready", Duration::from_secs(30), || {
        let r = ready_events(&nats, series);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(ready[0].instances, 1);
    proc.assert_running();
}
