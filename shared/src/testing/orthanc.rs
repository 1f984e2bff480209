//! A real PACS for tests: Orthanc (the compose stack's) on free loopback ports, with a
//! fresh storage and index per run, no plugins, and the DICOM modalities a test names.
//!
//! The binary is found in `RADFLOW_ORTHANC`, then at `/usr/sbin/Orthanc` (Debian's
//! `orthanc` package), then on `PATH`. Like nats-server, a missing binary is an error
//! that says how to install it, never a skipped test.
//!
//! Its REST API is spoken with reqwest's blocking client, so that tests need no
//! runtime of their own (call it from a plain `#[test]`, not inside a tokio runtime).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer `GET /system`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one REST call may take; a synchronous C-STORE of a study
/// (`/modalities/<name>/store`) answers only when the transfer is done.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How Orthanc reports a port that another process holds.
const PORT_TAKEN: &str = "privileged or already in use";

/// A running Orthanc; killed on drop, its folder (configuration, storage, index and
/// log) removed.
pub struct Orthanc {
    child: Option<Child>,
    dir: PathBuf,
    aet: String,
    http_port: u16,
    dicom_port: u16,
}

impl Orthanc {
    /// Starts a fresh server whose AE title is `aet`, knowing the DICOM `modalities`
    /// as `(name, ae_title, host, port)`: the nodes it may send to with
    /// `POST /modalities/<name>/store`. It accepts C-STORE of any SOP class from any
    /// calling AE, but only addressed to its own AE title, as a PACS would: a sender
    /// that uses the wrong Called AE title is rejected.
    pub fn start(aet: &str, modalities: &[(&str, &str, &str, u16)]) -> io::Result<Self> {
        let binary = find_binary()?;
        let dir = std::env::temp_dir().join(format!(
            "radflow-orthanc-{}-{:08x}",
            std::process::id(),
            crate::util::now_ms() as u32 ^ super::rand_suffix()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            child: None,
            dir,
            aet: aet.to_owned(),
            http_port: 0,
            dicom_port: 0,
        };
        // Free ports are picked, then released for Orthanc to bind: another process may
        // take one in between. Such a start fails on a port in use; pick again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            [server.http_port, server.dicom_port] = free_ports()?;
            server.write_config(modalities)?;
            match server.spawn(&binary) {
                Ok(()) => return Ok(server),
                Err(_) if attempt < 4 && server.log().contains(PORT_TAKEN) => server.kill(),
                Err(e) => return Err(e),
            }
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("orthanc.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("orthanc.log")
    }

    fn write_config(&self, modalities: &[(&str, &str, &str, u16)]) -> io::Result<()> {
        let modalities: serde_json::Map<String, serde_json::Value> = modalities
            .iter()
            .map(|(name, ae, host, port)| ((*name).to_owned(), serde_json::json!([ae, host, port])))
            .collect();
        let config = serde_json::json!({
            "Name": format!("radflow-test-{}", self.aet),
            "StorageDirectory": self.dir.join("storage"),
            "IndexDirectory": self.dir.join("index"),
            "StorageCompression": false,
            "HttpServerEnabled": true,
            "HttpPort": self.http_port,
            // Loopback callers only, without credentials: nothing outside this machine
            // reaches the test server, whatever interface it binds.
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpDescribeErrors": true,
            "DicomServerEnabled": true,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": true,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": true,
            "UnknownSopClassAccepted": true,
            "DicomScuTimeout": 30,
            "DicomModalities": modalities,
            "OrthancPeers": {},
            // Only what this file names: none of the plugins a package installs.
            "Plugins": [],
            "LuaScripts": [],
            "SaveJobs": false,
        });
        std::fs::write(self.config_path(), serde_json::to_vec_pretty(&config)?)
    }

    fn spawn(&mut self, binary: &Path) -> io::Result<()> {
        let log = std::fs::File::create(self.log_path())?;
        let child = Command::new(binary)
            .arg(self.config_path())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot start {}: {e}", binary.display()))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "Orthanc exited ({status}); log:\n{}",
                    self.log_tail()
                )));
            }
            if matches!(self.request("GET", "/system", b""), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "Orthanc did not answer on port {} within {} s; log:\n{}",
                    self.http_port,
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its DICOM port on 127.0.0.1.
    pub fn dicom_port(&self) -> u16 {
        self.dicom_port
    }

    /// Its HTTP port on 127.0.0.1.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `http://127.0.0.1:<http port>`
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Its AE title.
    pub fn aet(&self) -> &str {
        &self.aet
    }

    /// `GET path` of the REST API; the body of a 2xx answer as text, else an error
    /// with the status and Orthanc's description.
    pub fn get(&self, path: &str) -> io::Result<String> {
        self.get_bytes(path).map(text)
    }

    /// `GET path`, the body as bytes (`/instances/<id>/file`).
    pub fn get_bytes(&self, path: &str) -> io::Result<Vec<u8>> {
        self.call("GET", path, b"")
    }

    /// `GET path`, the body as JSON.
    pub fn get_json(&self, path: &str) -> io::Result<serde_json::Value> {
        json(&self.get_bytes(path)?, path)
    }

    /// `POST path` with `body`; the body of a 2xx answer as text.
    pub fn post(&self, path: &str, body: impl AsRef<[u8]>) -> io::Result<String> {
        self.call("POST", path, body.as_ref()).map(text)
    }

    /// Stores a DICOM Part-10 file through `POST /instances`; Orthanc's ID of the
    /// instance.
    pub fn upload(&self, dicom: &[u8]) -> io::Result<String> {
        let answer = json(&self.call("POST", "/instances", dicom)?, "/instances")?;
        match (answer["ID"].as_str(), answer["Status"].as_str()) {
            (Some(id), Some("Success" | "AlreadyStored")) => Ok(id.to_owned()),
            _ => Err(io::Error::other(format!("upload refused: {answer}"))),
        }
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A request whose answer must be 2xx.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> io::Result<Vec<u8>> {
        let (status, answer) = self.request(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            let shown: String = text(answer).chars().take(2000).collect();
            Err(io::Error::other(format!(
                "Orthanc answers {method} {path} with {status}: {shown}"
            )))
        }
    }

    /// One request; the status and the body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(io::Error::other)?;
        let answer = reqwest::blocking::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(io::Error::other)?
            .request(method, format!("{}{path}", self.http_url()))
            .header("Content-Type", "application/octet-stream")
            .body(body.to_vec())
            .send()
            .map_err(io::Error::other)?;
        let status = answer.status().as_u16();
        let body = answer.bytes().map_err(io::Error::other)?;
        Ok((status, body.to_vec()))
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn json(bytes: &[u8], path: &str) -> io::Result<serde_json::Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| io::Error::other(format!("Orthanc's answer to {path} is not JSON: {e}")))
}

/// Two distinct free loopback ports (HTTP, DICOM), bound together and released.
fn free_ports() -> io::Result<[u16; 2]> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok([a.local_addr()?.port(), b.local_addr()?.port()])
}

fn find_binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("RADFLOW_ORTHANC") {
        return Ok(PathBuf::from(path));
    }
    let debian = Path::new("/usr/sbin/Orthanc");
    if debian.is_file() {
        return Ok(debian.to_owned());
    }
    if let Some(path) = super::on_path("Orthanc") {
        return Ok(path);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "Orthanc not found: `apt-get install orthanc` (.ci/setup does it), or set \
         RADFLOW_ORTHANC to the binary",
    ))
}
