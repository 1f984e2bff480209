//! Log lines never carry patient data.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use radflow_listener::scp::ScpConfig;
use radflow_listener::scu;

use crate::helpers::*;

/// Everything logged by any test of this binary, at every level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let for_writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || SharedBuffer(for_writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_patient_data() {
    let logs = captured_logs();
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("logs");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let liar = Ct::new(&ct.study, &ct.series, 2, 64);
    let liar_path = dir.path("liar.dcm");
    write_ct_with_meta_instance(&liar_path, &liar, &new_uid());
    let addr = server.addr.to_string();
    let report = scu::send_files(&addr, "LOGSCU", "RADFLOW", &[path.clone(), liar_path])
        .await
        .unwrap();
    assert_eq!(report.sent, 1);
    let out = run_tool(
        &dcmtk("storescu"),
        &[
            "-aec",
            "RADFLOW",
            "127.0.0.1",
            &server.port(),
            path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success());
    server.wait_releases(2).await;

    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    // The listener did log: acceptance and release of these associations.
    assert!(text.contains("association accepted"), "{text}");
    assert!(text.contains("association released"), "{text}");
    assert!(
        text.contains("calling_ae=\"LOGSCU\"") || text.contains("calling_ae=LOGSCU"),
        "{text}"
    );
    for secret in ["Doe^Jane", "Doe", "RF-0001", "20240131"] {
        assert!(
            !text.contains(secret),
            "log contains patient data {secret:?}"
        );
    }
}
