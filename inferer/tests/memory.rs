//! Memory stays flat across many jobs: after the first jobs have warmed up the
//! allocators (ONNX Runtime's arena, the blending buffers), more jobs of the same
//! size must not grow the process. This is the CPU side of "GPU memory stays flat":
//! the same fixed shapes and reused buffers keep the CUDA arena at its warm-up size.
//! Alone in its test binary so that no other test's allocations are measured.
//!
//! glibc keeps freed memory in per-thread arenas and returns it to the system when it
//! sees fit, so a single reading of the resident size swings by tens of MiB from one
//! job to the next. Each reading is therefore taken after `malloc_trim(0)` (what is
//! left is what the process really holds; it still moves by up to ~30 MiB with ONNX
//! Runtime's arena and the allocator's arenas), and the last third of the jobs may not
//! go beyond the high-water mark of the jobs before it: a leak of a MiB per job would
//! show.

mod common;

use std::sync::Arc;

use ndarray::Array3;
use radflow_inferer::registry::ModelHub;
use radflow_inferer::session::{ExecutionConfig, ProviderRequest};
use radflow_inferer::worker::Inferer;
use radflow_shared::bus::{Bus, InProcBus};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::Registry;
use radflow_shared::store::Store;
use radflow_shared::worker::{Handler, Outcome};
use radflow_volume::Volume;

use common::random_values;
use common::stage::{delivery, grid, put_job};

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_flat_over_many_jobs() {
    radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
    let registry = Registry::builtin();
    let spec = registry.models[0].clone();
    let metrics = Metrics::new();
    let m = metrics.clone();
    let exec = ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(2),
        ..ExecutionConfig::default()
    };
    let hub = tokio::task::spawn_blocking(move || ModelHub::load(registry, exec, m))
        .await
        .unwrap();
    let store = Store::memory();
    let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
    let inferer = Inferer {
        store: store.clone(),
        bus,
        models: Arc::new(hub),
        metrics,
    };

    // 100 × 110 × 64 voxels: 2 × 2 × 1 windows of the demo model's 96³ patch.
    let data =
        Array3::from_shape_vec((64, 110, 100), random_values(1, 64 * 110 * 100, 0.3, 0.7)).unwrap();
    let volume = Volume::new(grid([100, 110, 64], 1.5), data).unwrap();
    let first = put_job(&store, "8.8.8", 1, &spec, &volume).await;

    let model = inferer
        .models
        .current()
        .get(&spec.reference())
        .unwrap()
        .model
        .clone();
    let runs_before = model.counts().runs;
    const JOBS: u32 = 48;
    let mut readings = Vec::new();
    for revision in 1..=JOBS {
        // A new revision of the same series: the same store keys, a new result.
        let mut job = first.clone();
        job.revision = revision;
        let outcome = inferer.handle(&delivery(&job)).await.unwrap();
        assert_eq!(outcome, Outcome::Done);
        // SAFETY: malloc_trim only releases free memory; it is safe to call anytime.
        unsafe { libc::malloc_trim(0) };
        readings.push(rss_bytes());
    }
    assert_eq!(model.counts().runs - runs_before, u64::from(JOBS) * 4);
    let last_third = readings.len() * 2 / 3;
    let before = *readings[2..last_third].iter().max().unwrap();
    let last = *readings[last_third..].iter().max().unwrap();
    let growth = last as i64 - before as i64;
    // One job allocates ~30 MB (volume, logits, weights, labels, outputs); 16 more jobs
    // may not keep more than a fraction of one.
    assert!(
        growth < 8 << 20,
        "resident memory grew by {} MiB in the last {} jobs: {:?} MiB",
        growth >> 20,
        readings.len() - last_third,
        readings.iter().map(|r| r >> 20).collect::<Vec<_>>()
    );
}
