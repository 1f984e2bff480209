//! Data for retraining end to end: three synthetic series are scored through a real
//! nats-server, a preprocessor and an inferer, then `radflow export-dataset` writes
//! them out as training pairs, once plainly and once de-identified. nibabel reads every
//! pair back: image and label map on the same grid, label values the manifest names,
//! the labels equal to the stored result sampled independently (numpy, nearest
//! neighbour) at the image's voxel centres, each label over the intensities it stands
//! for. The de-identified folder must hold no UID anywhere, not even inside the
//! compressed NIfTI headers.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";
const SERIES: u64 = 3;

/// Reads an export folder with nibabel; prints what it found and what is wrong.
const CHECK: &str = r#"
import gzip, json, os, sys
import numpy as np, nibabel as nib
out, uids, store = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
manifest = json.load(open(os.path.join(out, "manifest.json")))
lines = [json.loads(l) for l in open(os.path.join(out, "manifest.jsonl")) if l.strip()]
problems = []
if lines != manifest["items"]:
    problems.append("manifest.jsonl does not hold the items of manifest.json")
indices = {l["index"] for l in manifest["labels"]}
items = []
for it in manifest["items"]:
    img = nib.load(os.path.join(out, it["image"]))
    lab = nib.load(os.path.join(out, it["label"]))
    image, labels = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    shape = list(it["shape"])
    if list(image.shape) != shape or list(labels.shape) != shape:
        problems.append(f"{it['id']}: shapes {image.shape} {labels.shape} vs manifest {shape}")
    if not np.allclose(img.affine, lab.affine, atol=1e-4):
        problems.append(f"{it['id']}: affines differ: {img.affine.tolist()} {lab.affine.tolist()}")
    if not np.allclose(img.header.get_zooms()[:3], it["spacing_mm"], atol=1e-4):
        problems.append(f"{it['id']}: spacing {img.header.get_zooms()} vs {it['spacing_mm']}")
    if labels.dtype != np.uint8:
        problems.append(f"{it['id']}: labels are {labels.dtype}")
    values = sorted(int(v) for v in np.unique(labels))
    if not set(values) <= indices:
        problems.append(f"{it['id']}: label values {values} not all in {sorted(indices)}")
    means = [float(image[labels == v].mean()) for v in values]
    # The stored result (source grid) sampled at each voxel centre, nearest neighbour,
    # edges extended (the demo preset has no pad value): what the export must hold.
    agreement = None
    if "source" in it:
        src = nib.load(os.path.join(store, "results", it["source"]["series_uid"],
                                    manifest["model"], "labels.nii.gz"))
        stored = np.asarray(src.dataobj)
        ijk = np.indices(labels.shape).reshape(3, -1)
        at = np.linalg.inv(src.affine) @ lab.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
        at = np.rint(at[:3]).astype(int)
        for axis in range(3):
            at[axis] = np.clip(at[axis], 0, stored.shape[axis] - 1)
        agreement = float((stored[at[0], at[1], at[2]].reshape(labels.shape) == labels).mean())
    items.append({
        "id": it["id"],
        "values": values,
        "means": means,
        "agreement": agreement,
        "descrip": [str(h["descrip"].astype(str)) + "|" + str(h["intent_name"].astype(str))
                    for h in (img.header, lab.header)],
    })
hits = []
for root, _, files in os.walk(out):
    for name in files:
        path = os.path.join(root, name)
        data = open(path, "rb").read()
        texts = [data, os.path.relpath(path, out).encode()]
        if name.endswith(".gz"):
            texts.append(gzip.decompress(data))
        hits += [f"{path}: {u}" for u in uids if any(u.encode() in t for t in texts)]
print(json.dumps({"manifest": manifest, "items": items, "problems": problems, "uid_hits": hits}))
"#;

fn check(out: &Path, uids: &[&str], store: &Path) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(CHECK)
        .arg(out)
        .arg(serde_json::to_string(uids).unwrap())
        .arg(store);
    let report: serde_json::Value =
        serde_json::from_slice(&run_ok(cmd, "nibabel check of the export").stdout).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report:#}");
    report
}

/// Every label map lies over the intensities it names: the demo model's classes are
/// air < fat < soft tissue < bone, so the mean image value under each label rises
/// with the label (a flipped or shifted label map breaks the order).
fn assert_aligned(report: &serde_json::Value) {
    for item in report["items"].as_array().unwrap() {
        let values = item["values"].as_array().unwrap();
        assert!(values.len() >= 3, "too few labels to check: {item}");
        let means: Vec<f64> = item["means"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        assert!(
            means.windows(2).all(|w| w[0] < w[1]),
            "label means do not rise with the label: {item}"
        );
    }
}

fn ids(report: &serde_json::Value) -> BTreeSet<String> {
    report["manifest"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn export_dataset_writes_aligned_pairs_and_deidentifies() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("export");
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let folder = work.path().join("archive");
    let truths: Vec<Truth> = (1..=SERIES)
        .map(|seed| {
            synth(
                &folder.join(format!("s{seed}")),
                64,
                12,
                &["--fov", "160", "--seed", &seed.to_string()],
            )
        })
        .collect();
    let series: BTreeSet<String> = truths.iter().map(|t| t.series_uid.clone()).collect();
    assert_eq!(series.len(), SERIES as usize);
    let mut uids: Vec<&str> = truths.iter().map(|t| t.series_uid.as_str()).collect();
    uids.extend(truths.iter().map(|t| t.study_uid.as_str()));

    let worker = |role: &str| {
        let mut cmd = radflow();
        cmd.arg(role)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &free_port().to_string()]);
        Proc::spawn(role, cmd, work.path())
    };
    let mut pre = worker("preprocessor");
    let mut inf = worker("inferer");

    let mut score = radflow();
    score
        .args(["score", "--model", "demo-tissue", "--wait"])
        .args(["--nats-url", &nats.url(), "--store-url", &store_url])
        .args(["--timeout-secs", "300"])
        .arg("--folder")
        .arg(&folder)
        .arg("--report")
        .arg(work.path().join("report"));
    let out = run_ok(score, "radflow score");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 scored"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    pre.assert_running();
    inf.assert_running();

    let export = |out: &Path, extra: &[&str]| {
        let mut cmd = radflow();
        cmd.args([
            "export-dataset",
            "--model",
            MODEL,
            "--store-url",
            &store_url,
        ])
        .arg("--out")
        .arg(out)
        .args(extra);
        cmd
    };

    // Plain: ids are the series UIDs, each item says where it came from.
    let plain = work.path().join("plain");
    let out = run_ok(export(&plain, &[]), "radflow export-dataset");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 exported, 0 skipped"), "{stdout}");
    // Not on a terminal: progress comes as plain lines on stderr, the last one complete.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("3/3 series (100 %)")),
        "{stderr}"
    );
    let report = check(&plain, &uids, &store);
    let manifest = &report["manifest"];
    assert_eq!(manifest["schema_version"], 1);
    assert_eq!(manifest["model"], MODEL);
    assert_eq!(manifest["deidentified"], false);
    assert_eq!(manifest["model_sha256"].as_str().unwrap().len(), 64);
    let names: Vec<&str> = manifest["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["air", "fat", "soft_tissue", "bone"]);
    let items = manifest["items"].as_array().unwrap();
    assert_eq!(items.len(), SERIES as usize, "{manifest:#}");
    assert_eq!(ids(&report), series);
    for item in items {
        let truth = truths
            .iter()
            .find(|t| item["id"] == t.series_uid.as_str())
            .unwrap();
        assert_eq!(item["source"]["series_uid"], truth.series_uid.as_str());
        assert_eq!(item["source"]["study_uid"], truth.study_uid.as_str());
        assert_eq!(item["model"], MODEL);
        assert_eq!(item["model_sha256"], manifest["model_sha256"]);
        assert!(
            item["provider"].as_str().is_some_and(|p| !p.is_empty()),
            "{item}"
        );
        assert_eq!(item["image"], format!("images/{}.nii.gz", truth.series_uid));
        // The demo preset resamples to 1.5 mm: the label map left the 2.5 mm source
        // grid for the model's.
        assert_eq!(item["spacing_mm"], serde_json::json!([1.5, 1.5, 1.5]));
    }
    assert_aligned(&report);
    for item in report["items"].as_array().unwrap() {
        let agreement = item["agreement"].as_f64().unwrap();
        assert!(
            agreement >= 0.999,
            "the exported labels differ from the stored result resampled: {item}"
        );
    }

    // De-identified: no UID anywhere, ids are keyed hashes.
    let deid = work.path().join("deid");
    let salted = ["--deidentify", "--salt", "s3cret"];
    let out = run_ok(
        export(&deid, &salted),
        "radflow export-dataset --deidentify",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 exported"), "{stdout}");
    assert!(stdout.contains("de-identified"), "{stdout}");
    let report = check(&deid, &uids, &store);
    assert_eq!(report["uid_hits"], serde_json::json!([]), "{report:#}");
    for path in files(&deid) {
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for uid in &uids {
            assert!(!text.contains(uid), "{} holds {uid}", path.display());
            assert!(!path.to_string_lossy().contains(uid), "{}", path.display());
        }
    }
    let manifest = &report["manifest"];
    assert_eq!(manifest["deidentified"], true);
    let deid_ids = ids(&report);
    assert_eq!(deid_ids.len(), SERIES as usize);
    assert!(deid_ids.is_disjoint(&series), "{deid_ids:?}");
    for item in manifest["items"].as_array().unwrap() {
        assert!(item.get("source").is_none(), "{item}");
        let id = item["id"].as_str().unwrap();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    for item in report["items"].as_array().unwrap() {
        for descrip in item["descrip"].as_array().unwrap() {
            assert!(
                descrip
                    .as_str()
                    .unwrap()
                    .starts_with("radflow demo-tissue@1.0.0")
            );
        }
    }
    assert_aligned(&report);

    // Again with a volume gone: the same salt gives the same ids, the series without
    // a volume is skipped and its old files leave the folder.
    let gone = &truths[0].series_uid;
    std::fs::remove_dir_all(store.join("volumes").join(gone)).unwrap();
    let out = run_ok(
        export(&deid, &salted),
        "radflow export-dataset (a volume gone)",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 exported, 1 skipped"), "{stdout}");
    assert!(stdout.contains("2 old files removed"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("skipped series {gone}")),
        "{stderr}"
    );
    let report = check(&deid, &uids, &store);
    let again = ids(&report);
    assert_eq!(again.len(), 2);
    assert!(again.is_subset(&deid_ids), "{again:?} vs {deid_ids:?}");
    assert_eq!(files(&deid.join("images")).len(), 2);
    assert_eq!(files(&deid.join("labels")).len(), 2);

    // Nothing to export, or de-identification without a salt: an error.
    let uid_file = work.path().join("uids.txt");
    std::fs::write(&uid_file, "1.2.3.4.5\n").unwrap();
    let mut cmd = export(&work.path().join("none"), &[]);
    cmd.arg("--uids").arg(&uid_file);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing exported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = export(&work.path().join("nosalt"), &["--deidentify"])
        .env_remove("RADFLOW_EXPORT_SALT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--salt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
