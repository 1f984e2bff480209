//! The preprocessor stage with the in-process bus and an in-memory store: malformed
//! series end in the dead-letter subject with a machine-readable code and a readable
//! reason, a series that is not a volume is skipped, a gapped one is flagged, and the
//! worker keeps going through all of them to the good series that follow.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TempDir, files};
use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, OpenFileOptions};
use radflow_preprocessor::geometry::GeometryOptions;
use radflow_preprocessor::synth::{PhantomSpec, write_series};
use radflow_preprocessor::worker::{self, Preprocessor};
use radflow_shared::bus::inproc::InProcBus;
use radflow_shared::bus::{Bus, publish_event};
use radflow_shared::events::{DeadLettered, ReadyReason, SCHEMA_VERSION, SeriesReady, VolumeReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::Registry;
use radflow_shared::store::Store;
use radflow_shared::worker::WorkerConfig;
use radflow_volume::VolumeMeta;
use tokio_util::sync::CancellationToken;

const STUDY: &str = "2.25.100";

fn phantom(dir: &std::path::Path, size: usize, slices: usize) {
    write_series(
        &PhantomSpec {
            size,
            slices,
            fov_mm: 300.0,
            slice_spacing_mm: 3.0,
            ..Default::default()
        },
        dir,
    )
    .unwrap();
}

/// Stores files as the instances of `series` and announces the series as ready.
async fn send(store: &Store, bus: &dyn Bus, series: &str, files: Vec<Vec<u8>>) {
    let n = files.len();
    for (i, bytes) in files.into_iter().enumerate() {
        store
            .put_instance(STUDY, series, &format!("{series}.{i}"), Bytes::from(bytes))
            .await
            .unwrap();
    }
    let ev = SeriesReady {
        schema_version: SCHEMA_VERSION,
        correlation_id: format!("c-{series}"),
        study_uid: STUDY.into(),
        series_uid: series.into(),
        revision: 1,
        instances: n as u32,
        modality: "CT".into(),
        called_ae: "RADFLOW".into(),
        calling_ae: "TEST".into(),
        reason: ReadyReason::Quiet,
        ready_at_ms: 0,
        lane: Default::default(),
        models: vec![],
    };
    publish_event(bus, &ev).await.unwrap();
}

fn read_all(dir: &std::path::Path) -> Vec<Vec<u8>> {
    files(dir)
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

/// A file relabelled as MPEG-2 video, a syntax the preprocessor does not decode, with
/// its pixel data as one fragment.
fn as_video(bytes: &[u8]) -> Vec<u8> {
    let obj = OpenFileOptions::new().from_reader(bytes).unwrap();
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(obj.meta().media_storage_sop_class_uid())
        .media_storage_sop_instance_uid(obj.meta().media_storage_sop_instance_uid())
        .transfer_syntax(uids::MPEG2MPML)
        .implementation_class_uid("2.25.99")
        .build()
        .unwrap();
    let mut dataset = obj.into_inner();
    let frame = dataset
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    dataset.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new_fragments(vec![frame.into_owned()]),
    ));
    let mut out = Vec::new();
    dataset.with_exact_meta(meta).write_all(&mut out).unwrap();
    out
}

/// A file with one attribute removed.
fn without(bytes: &[u8], tag: dicom_core::Tag) -> Vec<u8> {
    let mut obj = OpenFileOptions::new().from_reader(bytes).unwrap();
    obj.remove_element(tag);
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_series_are_dead_lettered_and_the_worker_keeps_going() {
    let t = TempDir::new("worker");
    let good = t.dir("good");
    phantom(&good, 32, 12);

    let inproc = Arc::new(InProcBus::new());
    let bus: Arc<dyn Bus> = inproc.clone();
    let store = Store::memory();

    // 1. One slice without Image Position (Patient).
    let mut files_ = read_all(&good);
    files_[3] = without(&files_[3], tags::IMAGE_POSITION_PATIENT);
    send(&store, &*bus, "2.25.1", files_).await;
    // 2. Two stacks of different matrix sizes, each big enough to be a volume.
    let small = t.dir("small");
    phantom(&small, 24, 6);
    let mut mixed = read_all(&good);
    mixed.truncate(6);
    mixed.extend(read_all(&small));
    send(&store, &*bus, "2.25.2", mixed).await;
    // 3. Truncated pixel data.
    let mut files_ = read_all(&good);
    let len = files_[5].len();
    files_[5].truncate(len - 700);
    send(&store, &*bus, "2.25.3", files_).await;
    // 4. A syntax that cannot be decoded here (video).
    let video = read_all(&good).iter().map(|f| as_video(f)).collect();
    send(&store, &*bus, "2.25.4", video).await;
    // 5. Not a volume: a single image. Skipped, not dead-lettered.
    let mut single = read_all(&good);
    single.truncate(1);
    send(&store, &*bus, "2.25.5", single).await;
    // 6. A missing slice: built, flagged.
    let mut gapped = read_all(&good);
    gapped.remove(6);
    send(&store, &*bus, "2.25.6", gapped).await;
    // 7. A good series after all of them.
    send(&store, &*bus, "2.25.7", read_all(&good)).await;

    let pre = Arc::new(Preprocessor {
        store: store.clone(),
        bus: bus.clone(),
        registry: Arc::new(Registry::builtin()),
        metrics: Metrics::new(),
        geometry: GeometryOptions::default(),
        volume_gzip_level: worker::volume_gzip_level(&store, None),
    });
    let shutdown = CancellationToken::new();
    let mut config = WorkerConfig::new(worker::consumer());
    config.concurrency = 2;
    let running = tokio::spawn(worker::run(pre, config, shutdown.clone()));

    let started = Instant::now();
    loop {
        let done = inproc.pending("RADFLOW_SERIES", "preprocessor") == 0
            && inproc.stream_messages("RADFLOW_JOBS").len() >= 2
            && inproc.stream_messages("RADFLOW_DLQ").len() >= 4;
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the worker did not finish: {} pending, {} jobs, {} dead letters",
            inproc.pending("RADFLOW_SERIES", "preprocessor"),
            inproc.stream_messages("RADFLOW_JOBS").len(),
            inproc.stream_messages("RADFLOW_DLQ").len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap();

    let dead: BTreeMap<String, DeadLettered> = inproc
        .stream_messages("RADFLOW_DLQ")
        .into_iter()
        .map(|(subject, payload)| {
            assert_eq!(subject, "radflow.dlq.preprocessor");
            let d: DeadLettered = serde_json::from_slice(&payload).unwrap();
            (d.original["series_uid"].as_str().unwrap().to_owned(), d)
        })
        .collect();
    assert_eq!(dead.len(), 4, "{:?}", dead.keys());
    let expect = [
        (
            "2.25.1",
            "missing_attribute",
            "1 of 12 images have no Image Position (Patient)",
        ),
        (
            "2.25.2",
            "mixed_stacks",
            "the series mixes 2 stacks that could each be a volume: 6 image(s) 32x32 axial at \
             6 position(s), 6 image(s) 24x24 axial at 6 position(s)",
        ),
        ("2.25.3", "truncated_pixel_data", "pixel data is truncated"),
        (
            "2.25.4",
            "unsupported_transfer_syntax",
            "transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2",
        ),
    ];
    for (series, code, reason) in expect {
        let d = &dead[series];
        assert_eq!(d.code, code, "{series}: {}", d.reason);
        assert!(d.reason.contains(reason), "{series}: {}", d.reason);
        assert_eq!(
            d.attempts, 1,
            "{series}: permanent failures are not retried"
        );
        assert!(
            !d.reason.contains("PHANTOM"),
            "demographics in {}",
            d.reason
        );
    }

    // The gapped and the good series made one job each (demo-tissue routes CT of 10+
    // slices); the single image made none.
    let jobs: BTreeMap<String, VolumeReady> = inproc
        .stream_messages("RADFLOW_JOBS")
        .into_iter()
        .map(|(_, payload)| {
            let j: VolumeReady = serde_json::from_slice(&payload).unwrap();
            (j.series_uid.clone(), j)
        })
        .collect();
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["2.25.6", "2.25.7"]);
    let gap = jobs["2.25.6"].suspect_incomplete.as_deref().unwrap();
    assert!(gap.contains("about 1 slice(s) missing"), "{gap}");
    assert_eq!(jobs["2.25.7"].suspect_incomplete, None);
    let meta: VolumeMeta =
        serde_json::from_slice(&store.get(&jobs["2.25.6"].meta_key).await.unwrap()).unwrap();
    assert_eq!(meta.suspect_incomplete.as_deref(), Some(gap));
    assert_eq!(meta.source.dims, [32, 32, 12]);
    let volume = store.get(&jobs["2.25.7"].volume_key).await.unwrap();
    let vol = radflow_volume::nifti::read_nifti::<f32>(&volume).unwrap();
    assert_eq!(vol.grid, meta.volume);
    assert!(vol.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(
        !store
            .exists(&Store::volume_key(
                "2.25.5",
                "ct-1.5mm-window",
                radflow_shared::store::VolumeFile::Volume
            ))
            .await
            .unwrap()
    );
}
