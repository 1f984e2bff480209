//! The store against a real S3 server (SeaweedFS, the compose stack's): keys of the full
//! length DICOM UIDs allow, single and multipart uploads, listing by prefix, signatures.

use bytes::Bytes;
use radflow_shared::store::{S3Server, Store, StoreError};
use radflow_shared::testing::SeaweedFs;

/// A UID of the 64 characters the standard allows (PS3.5 §9.1).
fn uid64(n: u32) -> String {
    let root = "1.2.826.0.1.3680043.8.498.";
    let tail = format!("{n}{}", "7".repeat(64));
    format!("{root}{}", &tail[..64 - root.len()])
}

#[tokio::test]
async fn keys_of_64_character_uids_single_and_multipart_and_listing() {
    let s3 = SeaweedFs::start().expect("SeaweedFS starts");
    let store = s3.store();
    let (study, series) = (uid64(1), uid64(2));
    assert_eq!(study.len(), 64);

    // Single PUT: the longest instance key, 204 characters.
    let sop = uid64(3);
    let body = Bytes::from(vec![7u8; 1000]);
    let key = store
        .put_instance(&study, &series, &sop, body.clone())
        .await
        .expect("a 204-character key is stored");
    assert_eq!(key.len(), 204, "{key}");
    assert_eq!(store.get(&key).await.unwrap(), body);

    // Multipart: three parts, the first two of S3's 5 MiB minimum.
    let sop2 = uid64(4);
    let mut upload = store
        .begin_instance_upload(&study, &series, &sop2)
        .await
        .unwrap();
    let part = |b: u8, n: usize| Bytes::from(vec![b; n]);
    upload.put_part(part(1, 5 << 20)).await.unwrap();
    upload.put_part(part(2, 5 << 20)).await.unwrap();
    upload.put_part(part(3, 12345)).await.unwrap();
    assert!(
        !store.exists(upload.key()).await.unwrap(),
        "nothing visible before complete"
    );
    let key2 = upload.complete().await.unwrap();
    let back = store.get(&key2).await.unwrap();
    assert_eq!(back.len(), (10 << 20) + 12345);
    assert_eq!(back[0], 1);
    assert_eq!(back[5 << 20], 2);
    assert_eq!(back[back.len() - 1], 3);
    // A ranged read of a header: only the first bytes travel; past the end, all.
    let head = store.get_prefix(&key2, 4096).await.unwrap();
    assert_eq!((head.len(), head[4095]), (4096, 1));
    assert_eq!(store.get_prefix(&key, 1 << 20).await.unwrap(), body);

    // An aborted upload leaves nothing.
    let sop3 = uid64(5);
    let mut aborted = store
        .begin_instance_upload(&study, &series, &sop3)
        .await
        .unwrap();
    aborted.put_part(part(9, 5 << 20)).await.unwrap();
    aborted.abort().await;

    // Listing by prefix: the series holds exactly the two, with their sizes.
    let listed = store.list_instances(&study, &series).await.unwrap();
    let keys: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    let mut want = vec![(key.as_str(), 1000), (key2.as_str(), (10 << 20) + 12345)];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(store.list_series().await.unwrap(), vec![(study, series)]);

    store.delete(&key).await.unwrap();
    assert!(!store.exists(&key).await.unwrap());
    store.check().await.expect("readiness check answers");
}

#[tokio::test]
async fn a_radflow_store_url_with_prefix_and_wrong_credentials() {
    let s3 = SeaweedFs::start_with_bucket("radflow-prefix").expect("SeaweedFS starts");
    let prefixed = Store::open_s3(&format!("{}/site-a", s3.store_url()), &s3.server()).unwrap();
    prefixed
        .put("results/x/m@1/summary.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    // The prefix is a real folder in the bucket, seen from the bucket's root.
    let root = s3.store();
    assert!(
        root.exists("site-a/results/x/m@1/summary.json")
            .await
            .unwrap()
    );

    let mut wrong: S3Server = s3.server();
    wrong.secret_key = radflow_shared::secret::Secret::new("not-the-secret");
    let denied = Store::open_s3(&s3.store_url(), &wrong).unwrap();
    let err = denied
        .put("dicom/a/b/c.dcm", Bytes::from_static(b"x"))
        .await
        .expect_err("a wrong signature is refused");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(
        !root.exists("dicom/a/b/c.dcm").await.unwrap(),
        "nothing written"
    );

    let missing = Store::open_s3("s3://no-such-bucket", &s3.server()).unwrap();
    assert!(
        missing
            .put("dicom/a/b/c.dcm", Bytes::from_static(b"x"))
            .await
            .is_err(),
        "a bucket that does not exist is an error, not created on the fly"
    );
}

#[tokio::test]
async fn objects_survive_a_server_restart() {
    let mut s3 = SeaweedFs::start().expect("SeaweedFS starts");
    let store = s3.store();
    store
        .put("dicom/s/t/u.dcm", Bytes::from_static(b"kept"))
        .await
        .unwrap();
    s3.stop();
    s3.restart().expect("restarts on the same port");
    assert_eq!(&store.get("dicom/s/t/u.dcm").await.unwrap()[..], b"kept");
}
