//! Associations kept open between export jobs, against DCMTK's storescp: jobs that
//! follow each other share one association, and one that died while it was idle (the
//! peer restarted) is replaced without the job failing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use radflow_exporter::associations::Pool;
use radflow_exporter::destinations::Destinations;
use radflow_listener::scu::Part10;

/// Small CT objects (explicit VR little endian) written by pydicom.
fn objects(dir: &Path, n: usize) -> Vec<Part10> {
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

struct Storescp {
    child: Child,
    log: PathBuf,
}

impl Storescp {
    /// storescp on `port`, logging into `dir/<name>.log`.
    fn start(port: u16, dir: &Path, name: &str) -> Self {
        let inbox = dir.join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("/usr/bin/storescp")
            .args(["-v", "-aet", "PACS", "-od"])
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

    fn associations(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Association Acknowledged")
            .count()
    }

    fn stored(&self) -> usize {
        std::fs::read_dir(self.log.parent().unwrap().join("inbox"))
            .unwrap()
            .count()
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_share_an_association_and_one_that_died_while_idle_is_replaced() {
    let dir = std::env::temp_dir().join(format!("radflow-exporter-assoc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let scp = Storescp::start(port, &dir, "first");
    let destinations = Destinations::parse(
        &format!(
            "[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {port}\n"
        ),
        "test",
    )
    .unwrap();
    let pacs = destinations.get("pacs").unwrap();
    let objects = objects(&dir, 6);
    let pool = Pool::default();

    // Three jobs back to back: one association.
    for job in objects[..3].chunks(1) {
        let report = pool.send(pacs, job).await.unwrap();
        assert_eq!((report.sent, report.failed.len()), (1, 0), "{report:?}");
    }
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(
        scp.associations(),
        1,
        "{}",
        std::fs::read_to_string(&scp.log).unwrap()
    );

    // The peer goes away while the association is idle (a PACS restart): the next
    // job finds it broken, opens another and succeeds.
    drop(scp);
    let scp = Storescp::start(port, &dir, "second");
    let report = pool.send(pacs, &objects[3..5]).await.unwrap();
    assert_eq!((report.sent, report.failed.len()), (2, 0), "{report:?}");
    assert_eq!(scp.associations(), 1);

    // Idle associations are released when asked (the stage does it at shutdown).
    pool.release_idle(true).await;
    assert_eq!(pool.idle_count(), 0);
    let report = pool.send(pacs, &objects[5..]).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(scp.associations(), 2);
    pool.release_idle(true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while scp.stored() < 6 {
        assert!(
            Instant::now() < deadline,
            "storescp stored {} of 6",
            scp.stored()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(scp);
    let _ = std::fs::remove_dir_all(&dir);
}
