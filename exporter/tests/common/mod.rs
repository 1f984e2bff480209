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

/// In `dir`: the shared test PKI (`radflow_shared::testing::TestPki`): a CA
/// (`ca.crt`), a server certificate for 127.0.0.1 and localhost (`server.crt`,
/// `server.key`) and a client certificate (`client.crt`, `client.key`) signed by it,
/// and a self-signed certificate nobody trusts (`rogue.crt`, `rogue.key`).
pub fn make_pki(dir: &Path) {
    radflow_shared::testing::TestPki::create(dir).expect("test certificates (openssl)");
}
