//! Associations kept open between export jobs, against DCMTK's storescp: jobs that
//! follow each other share one association, and one that died while it was idle (the
//! peer restarted) is replaced without the job failing.

mod common;

use common::{Storescp, free_port, objects, scratch};
use radflow_exporter::associations::Pool;
use radflow_exporter::destinations::Destinations;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_share_an_association_and_one_that_died_while_idle_is_replaced() {
    let dir = scratch("assoc");
    let port = free_port();
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
    assert_eq!(scp.associations(), 1, "{}", scp.log_text());

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
    scp.wait_stored(6).await;
    drop(scp);
    let _ = std::fs::remove_dir_all(&dir);
}
