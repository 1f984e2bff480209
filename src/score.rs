//! `radflow score`: run a model over series already in the store (or a local folder),
//! through the same queues as live studies, in the batch lane.
//!
//! The command selects series, skips those that already have a result for the model
//! version (so a re-run resumes where the last one stopped), and keeps a bounded number
//! of scoring requests in flight: workers serve the batch lane only while no live work
//! waits, so archive scoring never delays a study from a scanner. Each request's message
//! id is derived from the series and the model version, so a request published twice
//! is deduplicated, and results are keyed the same way. A report (CSV and JSON Lines)
//! with one row per selected series is written locally and to the store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use radflow_preprocessor::decode;
use radflow_shared::bus::{Bus, publish_event};
use radflow_shared::events::{Lane, ReadyReason, SCHEMA_VERSION, SeriesReady};
use radflow_shared::models::{ModelSpec, Registry};
use radflow_shared::status;
use radflow_shared::store::Store;
use radflow_shared::util::{now_ms, sha256_hex};
use serde::Serialize;

use crate::cli::ScoreArgs;
use crate::progress::Progress;

/// What the filters look at, read from the first instance of a series.
#[derive(Debug, Clone, Default)]
struct SeriesInfo {
    study_uid: String,
    series_uid: String,
    modality: String,
    body_part: String,
    study_date: String,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    study_uid: String,
    series_uid: String,
    model: String,
    /// `scored`, `already_scored`, `failed`, `queued` (not finished when the command
    /// stopped waiting).
    status: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    label_volumes_ml: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    class_scores: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

/// The correlation id of a scoring request: stable for a series and model version.
fn correlation_id(series_uid: &str, model_ref: &str) -> String {
    sha256_hex(format!("score#{series_uid}#{model_ref}").as_bytes())[..16].to_owned()
}

fn date_ok(date: &str, since: Option<&str>, until: Option<&str>) -> bool {
    let normalize = |d: &str| d.replace('-', "");
    let d = normalize(date);
    since.is_none_or(|s| !d.is_empty() && d >= normalize(s))
        && until.is_none_or(|u| !d.is_empty() && d <= normalize(u))
}

async fn series_info(store: &Store, study: &str, series: &str) -> Result<Option<SeriesInfo>> {
    let Some(first) = store
        .list_instances(study, series)
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let bytes = store.get(&first.key).await?;
    let header = tokio::task::spawn_blocking(move || decode::read_header(&bytes)).await?;
    let image = header.ok().and_then(|h| h.images.into_iter().next());
    Ok(Some(SeriesInfo {
        study_uid: study.to_owned(),
        series_uid: series.to_owned(),
        modality: image
            .as_ref()
            .map(|i| i.modality.clone())
            .unwrap_or_default(),
        body_part: image
            .as_ref()
            .map(|i| i.body_part.clone())
            .unwrap_or_default(),
        study_date: image.map(|i| i.study_date).unwrap_or_default(),
    }))
}

/// Stores every DICOM file under `folder` as the listener would; returns the series.
async fn upload(store: &Store, folder: &Path) -> Result<Vec<(String, String)>> {
    let files = crate::tools::collect_files(std::slice::from_ref(&folder.to_owned()))?;
    let mut series = std::collections::BTreeSet::new();
    let mut stored = 0usize;
    for path in files {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
            continue;
        }
        let bytes = Bytes::from(bytes);
        let b = bytes.clone();
        let header = tokio::task::spawn_blocking(move || decode::read_header(&b)).await?;
        let Some(image) = header.ok().and_then(|h| h.images.into_iter().next()) else {
            eprintln!(
                "skipping {}: not an image this radflow reads",
                path.display()
            );
            continue;
        };
        let valid = |uid: &str| radflow_listener::dataset::is_valid_uid(uid);
        if !(valid(&image.study_uid) && valid(&image.series_uid) && valid(&image.sop_instance_uid))
        {
            eprintln!("skipping {}: missing or malformed UIDs", path.display());
            continue;
        }
        store
            .put_instance(
                &image.study_uid,
                &image.series_uid,
                &image.sop_instance_uid,
                bytes,
            )
            .await?;
        series.insert((image.study_uid, image.series_uid));
        stored += 1;
    }
    eprintln!("uploaded {stored} instance(s) of {} series", series.len());
    Ok(series.into_iter().collect())
}

/// `radflow score`
pub async fn score(args: ScoreArgs) -> Result<()> {
    let registry = Registry::load_or_builtin(args.models.models.as_deref())?;
    let model: ModelSpec = registry
        .find(&args.model)
        .with_context(|| format!("no model {:?} in the registry", args.model))?
        .clone();
    let reference = model.reference();
    let store = args.store.open()?;
    let bus: Arc<dyn Bus> = args
        .bus
        .connect_nats_within("radflow-score", Duration::from_secs(15))
        .await?;

    // 1. Candidates.
    let mut candidates = match &args.folder {
        Some(folder) => upload(&store, folder).await?,
        None => store.list_series().await?,
    };
    if let Some(prefix) = &args.prefix {
        let prefix = prefix.trim_start_matches("dicom/");
        candidates.retain(|(study, series)| format!("{study}/{series}").starts_with(prefix));
    }
    if let Some(file) = &args.uids {
        crate::tools::keep_listed(&mut candidates, file)?;
    }

    // 2. Filters that need a header.
    let needs_header = args.modality.is_some()
        || args.body_part.is_some()
        || args.since.is_some()
        || args.until.is_some();
    let mut selected = Vec::new();
    for (study, series) in candidates {
        let info = if needs_header {
            match series_info(&store, &study, &series).await? {
                Some(info) => info,
                None => continue,
            }
        } else {
            SeriesInfo {
                study_uid: study,
                series_uid: series,
                ..Default::default()
            }
        };
        let eq = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|w| w.eq_ignore_ascii_case(have.trim()))
        };
        if eq(&args.modality, &info.modality)
            && eq(&args.body_part, &info.body_part)
            && date_ok(
                &info.study_date,
                args.since.as_deref(),
                args.until.as_deref(),
            )
        {
            selected.push(info);
        }
    }
    if selected.is_empty() {
        bail!("no series matches the selection");
    }

    // 3. Resume: series that already have a result for this model version.
    let mut rows: Vec<Row> = Vec::with_capacity(selected.len());
    let mut todo = Vec::new();
    for info in selected {
        let row = Row {
            study_uid: info.study_uid.clone(),
            series_uid: info.series_uid.clone(),
            model: reference.clone(),
            status: "queued".into(),
            label_volumes_ml: BTreeMap::new(),
            class_scores: BTreeMap::new(),
            provider: None,
            total_ms: None,
            failure: None,
        };
        if !args.force && store.has_result(&info.series_uid, &reference).await? {
            rows.push(Row {
                status: "already_scored".into(),
                ..row
            });
        } else {
            todo.push(rows.len());
            rows.push(row);
        }
    }
    eprintln!(
        "{} series selected for {reference}: {} to score, {} already scored",
        rows.len(),
        todo.len(),
        rows.len() - todo.len()
    );

    // 4. Feed with a bounded number in flight, following results and dead letters.
    let bar = Progress::new(todo.len() as u64, "series");
    let started = Instant::now();
    let mut queue = todo.into_iter();
    let mut in_flight: HashMap<usize, Instant> = HashMap::new();
    let mut last_dlq_check = Instant::now() - Duration::from_secs(60);
    let deadline = args.timeout_secs.map(|s| started + Duration::from_secs(s));
    loop {
        while in_flight.len() < args.max_in_flight.max(1) {
            let Some(i) = queue.next() else { break };
            let row = &rows[i];
            let event = SeriesReady {
                schema_version: SCHEMA_VERSION,
                correlation_id: correlation_id(&row.series_uid, &reference),
                study_uid: row.study_uid.clone(),
                series_uid: row.series_uid.clone(),
                revision: 0,
                instances: 0,
                modality: String::new(),
                called_ae: String::new(),
                calling_ae: String::new(),
                reason: ReadyReason::Scored,
                ready_at_ms: now_ms(),
                lane: Lane::Batch,
                models: vec![reference.clone()],
            };
            publish_event(&*bus, &event).await?;
            in_flight.insert(i, Instant::now());
        }
        let all_queued = queue.len() == 0;
        if in_flight.is_empty() || (all_queued && !args.wait) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            bar.println("stopped waiting (--timeout-secs); unfinished series stay queued");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Finished: the result's summary.json is written last.
        let mut finished = Vec::new();
        for &i in in_flight.keys() {
            if store.has_result(&rows[i].series_uid, &reference).await? {
                finished.push(i);
            }
        }
        for i in finished {
            in_flight.remove(&i);
            rows[i].status = "scored".into();
            bar.inc(0);
        }
        // Failed: a dead letter with the request's correlation id.
        if last_dlq_check.elapsed() > Duration::from_secs(3) && !in_flight.is_empty() {
            last_dlq_check = Instant::now();
            let by_corr: HashMap<String, usize> = in_flight
                .keys()
                .map(|&i| (correlation_id(&rows[i].series_uid, &reference), i))
                .collect();
            for f in status::dead_letters(&*bus, 100_000).await? {
                if let Some(&i) = by_corr.get(&f.correlation_id) {
                    in_flight.remove(&i);
                    rows[i].status = "failed".into();
                    rows[i].failure = Some(format!("{} ({}: {})", f.code, f.stage, f.reason));
                    bar.inc(0);
                }
            }
        }
    }
    bar.finish();

    // 5. Figures of the finished ones, then the report.
    for row in rows
        .iter_mut()
        .filter(|r| r.status == "scored" || r.status == "already_scored")
    {
        let key = Store::result_key(&row.series_uid, &reference, "summary.json");
        if let Ok(bytes) = store.get(&key).await
            && let Ok(summary) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            for l in summary["labels"].as_array().into_iter().flatten() {
                if let (Some(name), Some(ml)) = (l["name"].as_str(), l["volume_ml"].as_f64()) {
                    row.label_volumes_ml.insert(name.to_owned(), ml);
                }
            }
            for c in summary["classes"].as_array().into_iter().flatten() {
                if let (Some(name), Some(score)) = (c["name"].as_str(), c["score"].as_f64()) {
                    row.class_scores.insert(name.to_owned(), score);
                }
            }
            row.provider = summary["provider"].as_str().map(str::to_owned);
            row.total_ms = summary["timings_ms"]["total"]
                .as_f64()
                .map(|ms| ms.round() as u64);
        }
    }
    write_report(&args.report, &store, &reference, &rows).await?;
    let count = |s: &str| rows.iter().filter(|r| r.status == s).count();
    println!(
        "{reference}: {} scored, {} already scored, {} failed, {} queued",
        count("scored"),
        count("already_scored"),
        count("failed"),
        count("queued")
    );
    if count("failed") > 0 {
        bail!("{} series failed; see the report", count("failed"));
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv(rows: &[Row]) -> String {
    let labels: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.label_volumes_ml.keys().map(String::as_str))
        .collect();
    let classes: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.class_scores.keys().map(String::as_str))
        .collect();
    let mut out = String::from("study_uid,series_uid,model,status,provider,total_ms,failure");
    for l in &labels {
        out.push_str(&format!(",{}_ml", csv_field(l)));
    }
    for c in &classes {
        out.push_str(&format!(",{}_score", csv_field(c)));
    }
    out.push('\n');
    for r in rows {
        let mut line = vec![
            csv_field(&r.study_uid),
            csv_field(&r.series_uid),
            csv_field(&r.model),
            r.status.clone(),
            r.provider.clone().unwrap_or_default(),
            r.total_ms.map(|t| t.to_string()).unwrap_or_default(),
            csv_field(r.failure.as_deref().unwrap_or("")),
        ];
        line.extend(labels.iter().map(|l| {
            r.label_volumes_ml
                .get(*l)
                .map(|v| format!("{v:.3}"))
                .unwrap_or_default()
        }));
        line.extend(classes.iter().map(|c| {
            r.class_scores
                .get(*c)
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default()
        }));
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

async fn write_report(base: &Path, store: &Store, reference: &str, rows: &[Row]) -> Result<()> {
    let csv_text = csv(rows);
    let mut jsonl = String::new();
    for r in rows {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    let with_ext = |ext: &str| -> PathBuf {
        let mut p = base.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (csv_path, jsonl_path) = (with_ext(".csv"), with_ext(".jsonl"));
    if let Some(dir) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&csv_path, &csv_text)?;
    std::fs::write(&jsonl_path, &jsonl)?;
    let stamp = now_ms();
    store
        .put(
            &format!("reports/{reference}/{stamp}.csv"),
            Bytes::from(csv_text),
        )
        .await?;
    store
        .put(
            &format!("reports/{reference}/{stamp}.jsonl"),
            Bytes::from(jsonl),
        )
        .await?;
    eprintln!(
        "report: {} and {} (and reports/{reference}/{stamp}.* in the store)",
        csv_path.display(),
        jsonl_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_filter_inclusively_in_either_notation() {
        assert!(date_ok("20250115", Some("2025-01-01"), Some("2025-01-31")));
        assert!(date_ok("20250101", Some("20250101"), None));
        assert!(!date_ok("20241231", Some("2025-01-01"), None));
        assert!(!date_ok("", Some("2025-01-01"), None));
        assert!(date_ok("", None, None));
    }

    #[test]
    fn csv_has_one_column_per_label_and_quotes_what_needs_it() {
        let row = |series: &str, status: &str, ml: Option<f64>| Row {
            study_uid: "1.2".into(),
            series_uid: series.into(),
            model: "m@1".into(),
            status: status.into(),
            label_volumes_ml: ml
                .map(|v| BTreeMap::from([("bone".to_owned(), v)]))
                .unwrap_or_default(),
            class_scores: BTreeMap::new(),
            provider: None,
            total_ms: None,
            failure: (status == "failed").then(|| "bad_geometry (preprocessor: a, b)".to_owned()),
        };
        let text = csv(&[
            row("1.2.3", "scored", Some(12.5)),
            row("1.2.4", "failed", None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "study_uid,series_uid,model,status,provider,total_ms,failure,bone_ml"
        );
        assert_eq!(lines[1], "1.2,1.2.3,m@1,scored,,,,12.500");
        assert_eq!(
            lines[2],
            "1.2,1.2.4,m@1,failed,,,\"bad_geometry (preprocessor: a, b)\","
        );
    }
}
