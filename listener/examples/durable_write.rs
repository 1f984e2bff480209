//! What flushing costs on a folder store, without the network: 300 instances of
//! 513 KiB (a CT slice) written the way the listener writes them (parts of 256 KiB,
//! each part's writeback started at once), each completed before the next begins,
//! with flushing (`fdatasync`, rename, folder `fsync`) and without. An optional gap
//! between parts stands for the network's pace. The two configurations alternate, round
//! by round; printed are the medians of the whole run and of the completion alone (from
//! the last part to the file in place).
//!
//! Usage: cargo run --release -p radflow-listener --example durable_write -- DIR [ROUNDS] [GAP_US]

use std::time::{Duration, Instant};

use bytes::Bytes;
use radflow_listener::journal::Journal;
use radflow_listener::local::LocalFiles;

const INSTANCES: usize = 300;
const SIZE: usize = 513 * 1024;
const PART: usize = 256 * 1024;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .expect("usage: durable_write DIR [ROUNDS] [GAP_US]"),
    );
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("rounds"));
    let gap = Duration::from_micros(args.next().map_or(0, |g| g.parse().expect("gap")));
    let data = Bytes::from((0..SIZE).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let configs = [("journal", true), ("fsync", true), ("no fsync", false)];
    let mut totals = vec![Vec::new(); configs.len()];
    let mut completions = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for (c, (_, fsync)) in configs.iter().enumerate() {
            let root = dir.join(format!("round-{round}-{c}"));
            std::fs::create_dir_all(&root)?;
            let journal = if c == 0 {
                Some(Journal::open(&root)?.0)
            } else {
                None
            };
            let files = LocalFiles::new(
                root.clone(),
                *fsync,
                journal.clone(),
                radflow_shared::metrics::Metrics::new(),
            );
            let started = Instant::now();
            let mut completing = Duration::ZERO;
            for i in 0..INSTANCES {
                let mut file = files.begin(&format!("dicom/1/2/{i}.dcm")).await?;
                for part in (0..SIZE).step_by(PART) {
                    if !gap.is_zero() {
                        std::thread::sleep(gap);
                    }
                    file.write(data.slice(part..(part + PART).min(SIZE)))
                        .await?;
                }
                let t = Instant::now();
                file.complete().await?;
                completing += t.elapsed();
            }
            totals[c].push(started.elapsed().as_secs_f64());
            completions[c].push(completing.as_secs_f64() * 1000.0 / INSTANCES as f64);
            if let Some(journal) = journal {
                tokio::task::spawn_blocking(move || journal.close()).await?;
            }
            std::fs::remove_dir_all(&root)?;
        }
    }
    println!(
        "| gap between parts | flushing | seconds for {INSTANCES} × 513 KiB | completion ms per instance |"
    );
    println!("| ---: | --- | ---: | ---: |");
    for (c, (name, _)) in configs.iter().enumerate() {
        println!(
            "| {} µs | {name} | {:.3} | {:.3} |",
            gap.as_micros(),
            median(&mut totals[c]),
            median(&mut completions[c])
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
