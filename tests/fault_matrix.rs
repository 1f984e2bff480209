//! The fault matrix: a stream of studies through the distributed pipeline (listener,
//! preprocessor, inferer and exporter as their own processes on a real nats-server,
//! DCMTK's storescp as the destination) while one component is SIGKILLed at random
//! points and restarted with the same flags, while nats-server or the S3 server
//! (SeaweedFS, the compose stack's) is killed and restarted under the workers, or while
//! the destination stalls for longer than the ack wait.
//!
//! After each fault the same invariants are checked:
//! - every instance answered Success is in the store, whole, under its SOP Instance UID;
//! - every series has exactly one result of the model version: one `summary.json`,
//!   one message in `RADFLOW_RESULTS`;
//! - the destination holds the SEG and the SR of every series and nothing else. The
//!   delivery is at least once and the objects' UIDs are derived from the result, so a
//!   resend after a kill (between the C-STORE and the ack) stores the same SOP Instance
//!   UID again and replaces itself: "exactly once" is two distinct SOP Instance UIDs per
//!   series, and the resends are counted and printed. Without a kill (the slow
//!   destination), nothing may arrive twice;
//! - no dead letter, no work left in the queues, every component running and ready.
//!
//! The kill points come from a seeded generator; the seed is printed, and
//! `RADFLOW_FAULT_SEED=<seed>` replays the same choices (the timing of the machine
//! still varies).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use radflow_shared::testing::{NatsServer, SeaweedFs};

const MODEL: &str = "demo-tissue@1.0.0";
/// Short, so that a killed worker's message comes back quickly.
const ACK_WAIT_SECS: u64 = 2;
/// High enough that a few kills of the same message never exhaust it.
const MAX_DELIVER: u64 = 10;
/// Series in each stream.
const SERIES: usize = 5;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that close seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// The generator of a test: from `RADFLOW_FAULT_SEED`, or from the clock; printed.
fn seeded(test: &str) -> Rng {
    let seed = match std::env::var("RADFLOW_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("RADFLOW_FAULT_SEED={s:?} is not a number")),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000
        }
    };
    let line = format!(
        "{test}: seed {seed} (replay: RADFLOW_FAULT_SEED={seed} cargo nextest run --test fault_matrix {test})"
    );
    println!("{line}");
    eprintln!("{line}");
    Rng::new(seed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    Preprocessor,
    Inferer,
    Exporter,
}

impl Role {
    fn command(self) -> &'static str {
        match self {
            Self::Listener => "listener",
            Self::Preprocessor => "preprocessor",
            Self::Inferer => "inferer",
            Self::Exporter => "exporter",
        }
    }
    /// The worker stages of the process, as its metrics name them.
    fn stages(self) -> &'static [&'static str] {
        match self {
            Self::Listener => &[],
            Self::Preprocessor => &["preprocessor"],
            Self::Inferer => &["inferer"],
            Self::Exporter => &["export-router", "exporter"],
        }
    }
    /// The longest wait after the process was seen holding a message before the kill:
    /// about the time the stage needs for one of these small series.
    fn kill_delay_ms(self) -> u64 {
        match self {
            // Not killed here (`tests/listener.rs` kills it mid-association).
            Self::Listener => 0,
            Self::Preprocessor => 100,
            Self::Inferer => 700,
            Self::Exporter => 3,
        }
    }
}

/// One radflow process of the pipeline, restartable with the same flags.
struct Component {
    name: String,
    role: Role,
    http: u16,
    proc: Option<Proc>,
    /// Time from each restart to `/readyz` 200.
    recoveries: Vec<Duration>,
}

/// A synthetic series and what was sent of it.
struct Series {
    truth: Truth,
    files: Vec<PathBuf>,
    /// SOP Instance UIDs of `files`, in the same order.
    sops: Vec<String>,
}

struct Pipeline {
    nats: NatsServer,
    /// The S3 server when the store is S3; `store` is then a local mirror of its bucket.
    s3: Option<SeaweedFs>,
    work: TempDir,
    /// The store's folder (or the mirror of the S3 bucket, see [`Pipeline::mirror`]).
    store: PathBuf,
    store_url: String,
    /// What the destination received.
    inbox: PathBuf,
    destinations: PathBuf,
    dicom_port: u16,
    pacs_port: u16,
    components: Vec<Component>,
    pacs: Proc,
}

impl Pipeline {
    /// Everything up and ready: nats-server, storescp, the listener, the preprocessor,
    /// the inferer and `exporters` exporters.
    fn start(name: &str, exporters: usize) -> Self {
        Self::start_on(name, exporters, None)
    }

    /// The same on an S3 store of `s3`.
    fn start_on(name: &str, exporters: usize, s3: Option<SeaweedFs>) -> Self {
        let nats = NatsServer::start().expect("nats-server");
        let work = TempDir::new(name);
        let store = work.path().join("store");
        let store_url = match &s3 {
            Some(s3) => s3.store_url(),
            None => format!("file://{}", store.display()),
        };
        let inbox = work.path().join("pacs");
        let (dicom_port, pacs_port) = (free_port(), free_port());
        let destinations = work.path().join("destinations.toml");
        destinations_file(&destinations, &[("pacs", "PACS", pacs_port)], &["pacs"]);
        let pacs = storescp(pacs_port, "PACS", &inbox, work.path(), true);
        let mut roles = vec![
            ("listener".to_owned(), Role::Listener),
            ("preprocessor".to_owned(), Role::Preprocessor),
            ("inferer".to_owned(), Role::Inferer),
        ];
        for i in 0..exporters {
            let name = if exporters == 1 {
                "exporter".to_owned()
            } else {
                format!("exporter-{}", i + 1)
            };
            roles.push((name, Role::Exporter));
        }
        let components = roles
            .into_iter()
            .map(|(name, role)| Component {
                name,
                role,
                http: free_port(),
                proc: None,
                recoveries: Vec::new(),
            })
            .collect();
        let mut p = Self {
            nats,
            s3,
            work,
            store,
            store_url,
            inbox,
            destinations,
            dicom_port,
            pacs_port,
            components,
            pacs,
        };
        for i in 0..p.components.len() {
            p.spawn(i);
        }
        for i in 0..p.components.len() {
            p.wait_ready(i);
        }
        wait_for("storescp", Duration::from_secs(20), || {
            p.pacs.assert_running();
            std::net::TcpStream::connect(("127.0.0.1", p.pacs_port)).ok()
        });
        p
    }

    /// The command line of a component: the same on every start.
    fn command(&self, i: usize) -> Command {
        let c = &self.components[i];
        let mut cmd = radflow();
        cmd.arg(c.role.command())
            .args([
                "--nats-url",
                &self.nats.url(),
                "--store-url",
                &self.store_url,
            ])
            .args(["--http-port", &c.http.to_string()]);
        match c.role {
            Role::Listener => {
                cmd.args(["--dicom-port", &self.dicom_port.to_string()])
                    // Ready 1 s after the association's release; a pause of 3 s within
                    // one (a loaded machine) does not split a series.
                    .args(["--series-quiet-secs", "3"])
                    .args(["--series-release-quiet-secs", "1"]);
            }
            Role::Preprocessor | Role::Inferer | Role::Exporter => {
                cmd.args(["--ack-wait-secs", &ACK_WAIT_SECS.to_string()])
                    .args(["--max-deliver", &MAX_DELIVER.to_string()]);
            }
        }
        if c.role == Role::Exporter {
            cmd.arg("--destinations").arg(&self.destinations);
        }
        if let Some(s3) = &self.s3 {
            cmd.envs(s3.env());
        }
        cmd
    }

    /// Copies what the S3 bucket holds and the mirror lacks (or holds at another size)
    /// into `store`, so that the checks read it as files. Nothing to do on a folder
    /// store. A server that is down leaves the mirror as it was.
    fn mirror(&self) {
        let Some(s3) = &self.s3 else { return };
        let store = s3.store();
        let root = self.store.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let Ok(objects) = store.list("").await else {
                return;
            };
            for o in objects {
                let path = root.join(&o.key);
                let same = std::fs::metadata(&path).is_ok_and(|m| m.len() == o.size);
                if same {
                    continue;
                }
                if let Ok(bytes) = store.get(&o.key).await {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                }
            }
        });
    }

    fn index(&self, role: Role) -> usize {
        self.components.iter().position(|c| c.role == role).unwrap()
    }

    fn spawn(&mut self, i: usize) {
        let cmd = self.command(i);
        let proc = Proc::spawn(&self.components[i].name, cmd, self.work.path());
        self.components[i].proc = Some(proc);
    }

    /// Waits for `/readyz` 200; returns how long it took.
    fn wait_ready(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        let http = self.components[i].http;
        let name = self.components[i].name.clone();
        let proc = self.components[i].proc.as_mut().unwrap();
        wait_for(&format!("{name} ready"), Duration::from_secs(60), || {
            proc.assert_running();
            http_get(http, "/readyz")
                .filter(|(s, _)| *s == 200)
                .map(|_| ())
        });
        started.elapsed()
    }

    fn kill(&mut self, i: usize) {
        self.components[i].proc.as_mut().unwrap().kill();
    }

    /// Starts a killed component again and waits until it is ready.
    fn restart(&mut self, i: usize) {
        self.spawn(i);
        let took = self.wait_ready(i);
        self.components[i].recoveries.push(took);
    }

    fn assert_running(&mut self) {
        for c in &mut self.components {
            c.proc.as_mut().unwrap().assert_running();
        }
        self.pacs.assert_running();
    }

    /// Messages the component has received and not yet settled, from its `/metrics`.
    fn holding(&self, i: usize) -> u64 {
        let c = &self.components[i];
        let Some((200, text)) = http_get(c.http, "/metrics") else {
            return 0;
        };
        let count = |stage: &str, outcome: &str| {
            let want =
                format!("radflow_messages_total{{stage=\"{stage}\",outcome=\"{outcome}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&want))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        c.role
            .stages()
            .iter()
            .map(|s| {
                let settled =
                    count(s, "processed") + count(s, "retried") + count(s, "dead_lettered");
                count(s, "received").saturating_sub(settled)
            })
            .sum()
    }

    fn logs(&self) -> Vec<String> {
        self.components
            .iter()
            .map(|c| {
                std::fs::read_to_string(self.work.path().join(format!("{}.log", c.name)))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// `radflow status --json`.
    fn status(&self) -> serde_json::Value {
        let mut cmd = radflow();
        cmd.args([
            "status",
            "--json",
            "--recent",
            "200",
            "--nats-url",
            &self.nats.url(),
        ]);
        let out = run_ok(cmd, "radflow status");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// `radflow dlq list --json`.
    fn dead_letters(&self) -> serde_json::Value {
        let mut cmd = radflow();
        cmd.args(["dlq", "list", "--json", "--nats-url", &self.nats.url()]);
        let out = run_ok(cmd, "radflow dlq list");
        serde_json::from_slice(&out.stdout).expect("dlq JSON")
    }

    fn summary(&self, series: &str) -> Option<serde_json::Value> {
        let path = self
            .store
            .join(format!("results/{series}/{MODEL}/summary.json"));
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// Sends a signal (`STOP`, `CONT`) to a process.
fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(proc.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {}", proc.name);
}

/// The SOP Instance UID of each file (one dcmdump for all), in order. dcmdump reads
/// each file whole, so a truncated one fails here.
fn sop_uids(files: &[PathBuf]) -> Vec<String> {
    let mut uids = Vec::with_capacity(files.len());
    for chunk in files.chunks(200) {
        let out = Command::new("/usr/bin/dcmdump")
            .args(["-q", "+F", "+P", "0008,0018"])
            .args(chunk)
            .output()
            .expect("dcmdump (DCMTK)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "dcmdump cannot read every file: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        // Per file: "# dcmdump (i/n): <path>" then its top-level (0008,0018) line.
        let mut current: Option<String> = None;
        for line in text.lines() {
            if line.starts_with("# dcmdump") {
                if let Some(prev) = current.take() {
                    uids.push(prev);
                }
                current = Some(String::new());
            } else if line.starts_with("(0008,0018)")
                && let (Some(a), Some(b)) = (line.find('['), line.find(']'))
                && let Some(cur) = current.as_mut()
                && cur.is_empty()
            {
                *cur = line[a + 1..b].to_owned();
            }
        }
        if let Some(prev) = current.take() {
            uids.push(prev);
        }
    }
    assert_eq!(uids.len(), files.len(), "one dcmdump header per file");
    for (f, u) in files.iter().zip(&uids) {
        assert!(!u.is_empty(), "{} has no SOP Instance UID", f.display());
    }
    uids
}

/// `count` small phantom series with distinct seeds (so distinct UIDs).
fn make_series(work: &Path, rng: &mut Rng, count: usize) -> Vec<Series> {
    let base = rng.range(1, 10_000);
    (0..count)
        .map(|i| {
            let dir = work.join(format!("series-{i}"));
            let slices = rng.range(16, 24) as usize;
            let seed = (base + i as u64).to_string();
            let truth = synth(&dir, 64, slices, &["--seed", &seed]);
            let files = dicom_files(&dir);
            assert_eq!(files.len(), truth.files);
            let sops = sop_uids(&files);
            Series { truth, files, sops }
        })
        .collect()
}

/// storescu (verbose: one line per answered C-STORE).
fn send(port: u16, files: &[PathBuf]) -> Output {
    dcmtk("storescu")
        .args(["-v", "-aet", "CT-SCANNER", "-aec", "RADFLOW", "127.0.0.1"])
        .arg(port.to_string())
        .args(files)
        .output()
        .expect("run storescu")
}

/// Sends every series on its own association, each starting at a random offset in
/// the first `spread`, so that some overlap. Returns the senders.
fn send_stream(
    port: u16,
    series: &[Series],
    rng: &mut Rng,
    spread: Duration,
) -> Vec<std::thread::JoinHandle<Output>> {
    series
        .iter()
        .map(|s| {
            let delay = rng.millis(0, spread.as_millis() as u64);
            let files = s.files.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                send(port, &files)
            })
        })
        .collect()
}

/// Every instance answered Success (all of them: nothing here refuses).
fn check_sent(series: &[Series], senders: Vec<std::thread::JoinHandle<Output>>) {
    for (s, sender) in series.iter().zip(senders) {
        let out = sender.join().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let successes = text.matches("Received Store Response (Success)").count();
        assert!(
            out.status.success() && successes == s.files.len(),
            "series {}: {successes} of {} instances answered Success:\n{text}",
            s.truth.series_uid,
            s.files.len()
        );
    }
}

/// What a kill did.
struct Fault {
    /// Since the first association started.
    at: Duration,
    /// Whether the process held a message just before it was killed.
    holding: bool,
}

/// Kills component `i` `kills` times at random points while the stream is processed,
/// restarting it each time with the same flags. A kill waits until the process holds a
/// message (its `/metrics`), then a random delay within the time the stage takes; if
/// the message was finished by then, it waits for the next one. If the process holds
/// none for a while (the work is elsewhere or done), it is killed anyway.
fn kill_at_random(
    p: &mut Pipeline,
    i: usize,
    kills: usize,
    rng: &mut Rng,
    t0: Instant,
) -> Vec<Fault> {
    let role = p.components[i].role;
    let mut done = Vec::new();
    for _ in 0..kills {
        // Let the restarted process take up some work before the next kill.
        std::thread::sleep(rng.millis(200, 1500));
        let patience = Instant::now() + rng.millis(4000, 12000);
        let delay = rng.millis(0, role.kill_delay_ms());
        let holding = loop {
            p.assert_running();
            if p.holding(i) > 0 {
                std::thread::sleep(delay);
                if p.holding(i) > 0 {
                    break true;
                }
            }
            if Instant::now() > patience {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        p.kill(i);
        done.push(Fault {
            at: t0.elapsed(),
            holding,
        });
        // Down for a while, as a crashed pod is before its restart.
        std::thread::sleep(rng.millis(0, 1000));
        p.restart(i);
    }
    done
}

/// How many deliveries were redeliveries, per stage: from the logs of every life of
/// every component (the `message` span of each log line names the stage, the series
/// revision, the subject and the attempt).
fn redeliveries(logs: &[String]) -> BTreeMap<String, u64> {
    let mut max_attempt: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let span = &v["span"];
        let (Some(stage), Some(attempt)) = (span["stage"].as_str(), span["attempt"].as_u64())
        else {
            continue;
        };
        let key = (
            stage.to_owned(),
            span["correlation_id"].as_str().unwrap_or("").to_owned(),
            span["subject"].as_str().unwrap_or("").to_owned(),
        );
        let e = max_attempt.entry(key).or_insert(0);
        *e = (*e).max(attempt);
    }
    let mut out = BTreeMap::new();
    for ((stage, _, _), attempt) in max_attempt {
        *out.entry(stage).or_insert(0) += attempt.saturating_sub(1);
    }
    out
}

/// Series UID -> how many times an inferer log says the model ran on it.
fn inferences(logs: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["fields"]["message"] == "inference completed"
            && let Some(series) = v["fields"]["series_uid"].as_str()
        {
            *out.entry(series.to_owned()).or_default() += 1;
        }
    }
    out
}

/// What the destination received: SOP Instance UID -> copies.
fn received(p: &Pipeline) -> BTreeMap<String, usize> {
    let files = files_in(&p.inbox);
    let mut out = BTreeMap::new();
    for uid in sop_uids(&files) {
        *out.entry(uid).or_insert(0) += 1;
    }
    out
}

/// Waits until every series has its result and both objects at the destination and
/// nothing is left in the work queues; returns when that was first seen.
fn wait_done(p: &mut Pipeline, series: &[Series], within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        p.assert_running();
        p.mirror();
        let results = series
            .iter()
            .filter(|s| p.summary(&s.truth.series_uid).is_some())
            .count();
        // storescp names files as they start to arrive: count them first, read them
        // only when there may be enough.
        let arrived = files_in(&p.inbox).len();
        if results == series.len() && arrived >= 2 * series.len() {
            let distinct = received(p).len();
            if distinct >= 2 * series.len() && queues_empty(&p.status()) {
                return Instant::now();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "not done after {within:?}: {results} of {} results, {arrived} objects at the destination\nstatus: {}\nlogs in {}",
                series.len(),
                serde_json::to_string_pretty(&p.status()).unwrap(),
                p.work.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// No message waiting or in flight in the work queues.
fn queues_empty(status: &serde_json::Value) -> bool {
    status["streams"].as_array().is_some_and(|streams| {
        streams
            .iter()
            .filter(|s| {
                ["RADFLOW_SERIES", "RADFLOW_JOBS", "RADFLOW_EXPORTS"]
                    .contains(&s["name"].as_str().unwrap_or(""))
            })
            .all(|s| {
                s["messages"] == 0
                    && s["consumers"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .all(|c| c["pending"] == 0 && c["ack_pending"] == 0)
                    })
            })
    })
}

/// What the checks saw, for the report.
struct Observed {
    arrivals: usize,
    distinct: usize,
    redeliveries: BTreeMap<String, u64>,
    inferred_twice: usize,
}

/// The invariants, after the pipeline is quiet.
fn check_invariants(p: &mut Pipeline, series: &[Series]) -> Observed {
    p.mirror();
    // Every instance answered Success is in the store, whole, under its UID.
    for s in series {
        let dir = p.store.join(format!(
            "dicom/{}/{}",
            s.truth.study_uid, s.truth.series_uid
        ));
        let stored = files_in(&dir);
        let names: BTreeSet<String> = stored
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let want: BTreeSet<String> = s.sops.iter().map(|u| format!("{u}.dcm")).collect();
        assert!(
            names == want,
            "series {}: {} stored instances, {} sent; missing {:?}, extra {:?}",
            s.truth.series_uid,
            names.len(),
            want.len(),
            want.difference(&names).collect::<Vec<_>>(),
            names.difference(&want).collect::<Vec<_>>()
        );
        for (file, uid) in stored.iter().zip(sop_uids(&stored)) {
            assert_eq!(
                file.file_name().unwrap().to_string_lossy(),
                format!("{uid}.dcm"),
                "a stored instance holds another UID than its name"
            );
        }
    }

    // Exactly one result per series: one summary, one message in the results stream.
    let results_dir: BTreeSet<String> = files_in(&p.store.join("results"))
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let uids: BTreeSet<String> = series.iter().map(|s| s.truth.series_uid.clone()).collect();
    assert_eq!(results_dir, uids, "result folders");
    let mut expected_objects: BTreeMap<String, String> = BTreeMap::new();
    for s in series {
        let uid = &s.truth.series_uid;
        let models = files_in(&p.store.join(format!("results/{uid}")));
        assert_eq!(models.len(), 1, "series {uid}: results {models:?}");
        let summary = p.summary(uid).expect("summary.json");
        assert_eq!(summary["series_uid"], uid.as_str());
        assert!(
            summary["labels"].as_array().is_some_and(|l| !l.is_empty()),
            "{summary}"
        );
        let objects = summary["dicom"].as_array().expect("dicom in summary");
        assert_eq!(objects.len(), 2, "SEG and SR of {uid}: {summary}");
        for o in objects {
            expected_objects.insert(
                o["sop_instance_uid"].as_str().unwrap().to_owned(),
                uid.clone(),
            );
        }
    }
    let status = p.status();
    let results = status["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "RADFLOW_RESULTS")
        .expect("RADFLOW_RESULTS in status")
        .clone();
    assert_eq!(
        results["messages"].as_u64(),
        Some(series.len() as u64),
        "result events: {results}"
    );
    let mut per_series: BTreeMap<String, usize> = BTreeMap::new();
    for r in status["recent_results"].as_array().unwrap() {
        assert_eq!(r["model"], MODEL, "{r}");
        *per_series
            .entry(r["series_uid"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_series.keys().cloned().collect::<BTreeSet<_>>(),
        uids,
        "series of the recent results"
    );
    assert!(
        per_series.values().all(|n| *n == 1),
        "results per series: {per_series:?}"
    );
    assert!(queues_empty(&status), "work left: {status}");

    // The destination: the SEG and the SR of each series, nothing else.
    let got = received(p);
    let distinct: BTreeSet<&String> = got.keys().collect();
    let want: BTreeSet<&String> = expected_objects.keys().collect();
    assert!(
        distinct == want,
        "destination: {} distinct objects, {} expected; missing {:?}, unexpected {:?}",
        distinct.len(),
        want.len(),
        want.difference(&distinct).collect::<Vec<_>>(),
        distinct.difference(&want).collect::<Vec<_>>()
    );
    let arrivals = got.values().sum();

    // No dead letter; every component running and ready.
    let dead = p.dead_letters();
    assert!(
        dead.as_array().is_some_and(|d| d.is_empty()),
        "dead letters: {dead}"
    );
    p.assert_running();
    for c in &p.components {
        let (code, body) = http_get(c.http, "/readyz").expect("readyz");
        assert_eq!(code, 200, "{} not ready: {body}", c.name);
    }

    let logs = p.logs();
    let inferred = inferences(&logs);
    Observed {
        arrivals,
        distinct: got.len(),
        redeliveries: redeliveries(&logs),
        inferred_twice: inferred.values().filter(|n| **n > 1).count(),
    }
}

/// One line of figures for the reliability table.
fn report(
    test: &str,
    what: &str,
    p: &Pipeline,
    kills: &[Fault],
    settled: Duration,
    seen: &Observed,
) {
    let recoveries: Vec<Duration> = p
        .components
        .iter()
        .flat_map(|c| c.recoveries.iter().copied())
        .collect();
    let restarts = match recoveries.iter().max() {
        Some(max) => format!(
            "{} restarts, ready within {:.1} s",
            recoveries.len(),
            max.as_secs_f64()
        ),
        None => "no restart".to_owned(),
    };
    println!(
        "{test}: {} {what} ({} holding a message) at {:?}; {restarts}; \
         done {:.1} s after the last fault; redeliveries {:?}; series inferred twice {}; \
         destination {} objects, {} arrivals ({} resends)",
        kills.len(),
        kills.iter().filter(|k| k.holding).count(),
        kills
            .iter()
            .map(|k| format!("{:.1}s", k.at.as_secs_f64()))
            .collect::<Vec<_>>(),
        settled.as_secs_f64(),
        seen.redeliveries,
        seen.inferred_twice,
        seen.distinct,
        seen.arrivals,
        seen.arrivals - seen.distinct
    );
}

/// The kill tests: a stream of studies, `role` killed 2–3 times at random points.
fn sigkill_during_stream(test: &str, role: Role) {
    let mut rng = seeded(test);
    let mut p = Pipeline::start(test, 1);
    let series = make_series(p.work.path(), &mut rng, SERIES);
    let target = p.index(role);
    let kills = rng.range(2, 3) as usize;

    let t0 = Instant::now();
    let senders = send_stream(p.dicom_port, &series, &mut rng, Duration::from_secs(6));
    let done = kill_at_random(&mut p, target, kills, &mut rng, t0);
    let last_fault = Instant::now();
    check_sent(&series, senders);
    let finished = wait_done(&mut p, &series, Duration::from_secs(120));
    // Anything redelivered late would arrive within an ack wait: give it the chance.
    std::thread::sleep(Duration::from_secs(ACK_WAIT_SECS + 1));
    let seen = check_invariants(&mut p, &series);
    report(
        test,
        "kills",
        &p,
        &done,
        finished.saturating_duration_since(last_fault),
        &seen,
    );
}

#[test]
fn sigkill_preprocessor_during_a_stream() {
    sigkill_during_stream("sigkill_preprocessor_during_a_stream", Role::Preprocessor);
}

#[test]
fn sigkill_inferer_during_a_stream() {
    sigkill_during_stream("sigkill_inferer_during_a_stream", Role::Inferer);
}

#[test]
fn sigkill_exporter_during_a_stream() {
    sigkill_during_stream("sigkill_exporter_during_a_stream", Role::Exporter);
}

/// The destination stops answering (storescp SIGSTOPped) for several ack waits while
/// two exporters share the export queue: the exporter that holds a job keeps it alive
/// with in-progress acks, so the other never gets it, and when the destination comes
/// back every object arrives exactly once.
#[test]
fn slow_destination_longer_than_the_ack_wait() {
    let test = "slow_destination_longer_than_the_ack_wait";
    let mut rng = seeded(test);
    let mut p = Pipeline::start(test, 2);
    let series = make_series(p.work.path(), &mut rng, SERIES);
    let exporters: Vec<usize> = (0..p.components.len())
        .filter(|i| p.components[*i].role == Role::Exporter)
        .collect();

    let t0 = Instant::now();
    let senders = send_stream(p.dicom_port, &series, &mut rng, Duration::from_secs(4));
    let stalls = 2;
    let mut done = Vec::new();
    for _ in 0..stalls {
        // Stall when an exporter is sending (or after a while regardless).
        let patience = Instant::now() + rng.millis(5000, 15000);
        while Instant::now() < patience && !exporters.iter().any(|i| p.holding(*i) > 0) {
            p.assert_running();
            std::thread::sleep(Duration::from_millis(5));
        }
        let holding = exporters.iter().any(|i| p.holding(*i) > 0);
        signal(&p.pacs, "STOP");
        let stall = rng.millis(3 * ACK_WAIT_SECS * 1000, 5 * ACK_WAIT_SECS * 1000);
        done.push(Fault {
            at: t0.elapsed(),
            holding,
        });
        std::thread::sleep(stall);
        signal(&p.pacs, "CONT");
        println!(
            "{test}: destination stopped for {:.1} s",
            stall.as_secs_f64()
        );
        std::thread::sleep(rng.millis(500, 2000));
    }
    let last_fault = Instant::now();
    check_sent(&series, senders);
    let finished = wait_done(&mut p, &series, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(ACK_WAIT_SECS + 1));
    let seen = check_invariants(&mut p, &series);
    report(
        test,
        "destination stalls",
        &p,
        &done,
        finished.saturating_duration_since(last_fault),
        &seen,
    );
    // Without a crash nothing is redone: every object arrived once, no job was
    // delivered twice.
    assert_eq!(
        seen.arrivals, seen.distinct,
        "objects arrived more than once"
    );
    assert!(
        seen.redeliveries.values().all(|n| *n == 0),
        "redeliveries without a crash: {:?}",
        seen.redeliveries
    );
    assert_eq!(seen.inferred_twice, 0);
}

/// A server under the pipeline: the bus or the object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Nats,
    S3,
}

/// `server` SIGKILLed and restarted (same port, same data) 2–3 times while the workers
/// hold messages of a stream that the listener has stored: every worker reconnects by
/// itself, work in hand when the server went is retried or finished, and every series
/// still ends with one result and its objects at the destination.
fn server_killed_mid_pipeline(test: &str, server: Server) {
    let mut rng = seeded(test);
    let s3 = (server == Server::S3).then(|| SeaweedFs::start().expect("SeaweedFS"));
    let mut p = Pipeline::start_on(test, 1, s3);
    let series = make_series(p.work.path(), &mut rng, SERIES);
    let workers: Vec<usize> = (0..p.components.len())
        .filter(|i| p.components[*i].role != Role::Listener)
        .collect();

    let t0 = Instant::now();
    // The sends finish first: an outage during a C-STORE is refused and resent by the
    // modality (`tests/listener.rs`, `tests/object_storage.rs`), which would make later
    // series revisions here.
    let senders = send_stream(p.dicom_port, &series, &mut rng, Duration::from_secs(3));
    check_sent(&series, senders);
    let kills = rng.range(2, 3) as usize;
    let mut done = Vec::new();
    for _ in 0..kills {
        let patience = Instant::now() + rng.millis(3000, 8000);
        let holding = loop {
            p.assert_running();
            if workers.iter().any(|i| p.holding(*i) > 0) {
                std::thread::sleep(rng.millis(0, 300));
                break true;
            }
            if Instant::now() > patience {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match server {
            Server::Nats => p.nats.stop(),
            Server::S3 => p.s3.as_mut().unwrap().stop(),
        }
        done.push(Fault {
            at: t0.elapsed(),
            holding,
        });
        let down = rng.millis(500, 3000);
        std::thread::sleep(down);
        match server {
            Server::Nats => p.nats.restart().expect("nats-server restarts"),
            Server::S3 => {
                p.s3.as_mut()
                    .unwrap()
                    .restart()
                    .expect("SeaweedFS restarts")
            }
        }
        println!("{test}: {server:?} down for {:.1} s", down.as_secs_f64());
        std::thread::sleep(rng.millis(500, 2000));
    }
    let last_fault = Instant::now();
    let finished = wait_done(&mut p, &series, Duration::from_secs(180));
    std::thread::sleep(Duration::from_secs(ACK_WAIT_SECS + 1));
    let seen = check_invariants(&mut p, &series);
    report(
        test,
        &format!("{server:?} kills"),
        &p,
        &done,
        finished.saturating_duration_since(last_fault),
        &seen,
    );
}

#[test]
fn nats_server_killed_mid_pipeline() {
    server_killed_mid_pipeline("nats_server_killed_mid_pipeline", Server::Nats);
}

#[test]
fn s3_server_killed_mid_pipeline() {
    server_killed_mid_pipeline("s3_server_killed_mid_pipeline", Server::S3);
}
