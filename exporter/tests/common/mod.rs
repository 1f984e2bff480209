//! Helpers of the exporter's tests: small objects written by pydicom, DCMTK's storescp
//! as the destination, and a test PKI made by openssl.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use radflow_listener::scu::Part10;

/// Small CT objects (explicit VR little endian) written by pydicom.
pub fn objects(dir: &Path, n: usize) -> Vec<Part10> {
    let script = r#"
import sys
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    ds.save_as(f"{out}/{i}.dcm", enforce_file_format=True)
"#;
    radflow_shared::testing::run_python(script, &[&dir.display().to_string(), &n.to_string()]);
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.dcm"));
            Part10 {
                name: path.display().to_string(),
                bytes: std::fs::read(&path).unwrap().into(),
            }
        })
        .collect()
}

/// A fresh scratch directory under the system's temporary one.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("radflow-exporter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Storescp {
    child: Child,
    pub log: PathBuf,
}

impl Storescp {
    /// storescp (AE title PACS) on `port`, logging into `dir/<name>.log`.
    pub fn start(port: u16, dir: &Path, name: &str) -> Self {
        Self::start_with(port, dir, name, &[])
    }

    /// [`Storescp::start`] with more options (TLS).
    pub fn start_with(port: u16, dir: &Path, name: &str, options: &[&str]) -> Self {
        let inbox = dir.join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("/usr/bin/storescp")
            .args(["-v", "-aet", "PACS"])
            .args(options)
            .arg("-od")
            .arg(&inbox)
            .arg(port.to_string())
            .stdout(Stdio::null())
            // -v logs to standard error.
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("storescp: apt-get install dcmtk (see .ci/setup)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "storescp did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn associations(&self) -> usize {
        self.log_text().matches("Association Acknowledged").count()
    }

    pub fn stored(&self) -> usize {
        std::fs::read_dir(self.log.parent().unwrap().join("inbox"))
            .unwrap()
            .count()
    }

    /// Waits (up to 10 s) until `n` objects are in the inbox.
    pub async fn wait_stored(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stored() < n {
            assert!(
                Instant::now() < deadline,
                "storescp stored {} of {n}",
                self.stored()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs openssl in `dir` and insists it succeeded.
fn openssl(dir: &Path, args: &[&str]) {
    let program = Path::new("/usr/bin/openssl");
    assert!(
        program.exists(),
        "openssl is required at /usr/bin/openssl (apt-get install openssl)"
    );
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `dir`: a test CA (`ca.crt`), a server certificate for 127.0.0.1 and localhost
/// (`server.crt`, `server.key`) and a client certificate (`client.crt`,
/// `client.key`) signed by it, and a self-signed certificate of another CA
/// (`rogue.crt`, `rogue.key`). All PEM, valid for two days.
pub fn make_pki(dir: &Path) {
    let self_signed = |name: &str, subject: &str| {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        openssl(
            dir,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt,
                "-subj", subject, "-days", "2",
            ],
        );
    };
    self_signed("ca", "/CN=radflow exporter test CA");
    self_signed("rogue", "/CN=rogue CA");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, crt, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
        );
        let subject = format!("/CN=radflow exporter test {who}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-extfile",
                &ext,
                "-days",
                "2",
            ],
        );
    }
}
