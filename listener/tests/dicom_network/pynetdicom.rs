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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_contexts_are_refused_and_ct_still_accepted() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("pynetdicom");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let script = dir.path("scu.py");
    std::fs::write(&script, SCRIPT).unwrap();

    let python = python_with_pynetdicom();
    let out = run_tool(
        &python,
        &[
            script.to_str().unwrap(),
            &server.port(),
            path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "script failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));

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
