//! The web page in a real browser: headless Chromium opens `/ui/` of an embedded
//! `radflow run` before and after DCMTK sends it a study (with demographics in every
//! file) and a series that the preprocessor must give up; the page must show the
//! result row with its preview loaded and its label volumes, the dead letter with its
//! reason, and no demographics. A screenshot is kept under the test's target folder.
//!
//! Needs Debian's `chromium` (`.ci/setup` installs it). Without it the test says so and
//! passes, unless `RADFLOW_REQUIRE_CHROMIUM` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MODEL: &str = "demo-tissue@1.0.0";

/// Demographics written into the study; none may reach the page.
const DEMOGRAPHICS: &[(&str, &str)] = &[
    ("(0010,0010)", "Pfefferminz^Walburga"),
    ("(0010,0020)", "PID-55120987"),
    ("(0010,0030)", "19380704"),
    ("(0008,0050)", "ACC44719023"),
];

/// The browser, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    })
}

/// Headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=…`); returns
/// its stdout. Virtual time lets the page's script fetch and redraw a few times (the
/// budget pauses while requests are pending) without waiting as long in real time.
fn browse(chromium: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .args([
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=6000")
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {args:?} {url}: {status}");
            return reader.join().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The start tag of the first element whose start tag contains `marker`, and what
/// follows it up to the end of its row.
fn row<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind("<tr")?;
    let end = dom[at..].find("</tr>").map_or(dom.len(), |e| at + e);
    Some(&dom[start..end])
}

/// The value of attribute `name` in `html`.
fn attr<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let at = html.find(&key)? + key.len();
    html[at..].split('"').next()
}

/// Width and height of a PNG file, from its header.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR")
        .then(|| (be(&bytes[16..20]), be(&bytes[20..24])))
}

fn send(dicom_port: u16, dir: &Path) {
    let out = storescu(dicom_port, "RADFLOW", &dicom_files(dir));
    assert!(
        out.status.success(),
        "storescu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_page_shows_a_result_with_its_preview_in_a_browser() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("RADFLOW_REQUIRE_CHROMIUM").is_none(),
            "RADFLOW_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!(
            "SKIPPED: chromium is not installed (apt-get install chromium, or run .ci/setup)"
        );
        return;
    };
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page");
    std::fs::create_dir_all(&artifacts).unwrap();
    let work = TempDir::new("web-page");
    let profile = work.path().join("chromium-profile");
    let data = work.path().join("data");
    let (dicom_port, http_port) = (free_port(), free_port());
    let mut cmd = embedded(&data, dicom_port, http_port);
    cmd.args(["--series-quiet-secs", "1", "--max-deliver", "1"]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);
    wait_for("radflow ready", Duration::from_secs(60), || {
        run.assert_running();
        http_get(http_port, "/readyz").filter(|(code, _)| *code == 200)
    });
    // `/` leads to the page.
    let (code, _) = http_get(http_port, "/").unwrap();
    assert_eq!(code, 303);
    let url = format!("http://127.0.0.1:{http_port}/ui/");

    // Before any study: the script ran (it marks the body when data came) and the
    // tables are empty.
    let before = browse(&chromium, &profile, &url, &["--dump-dom"]);
    assert!(
        attr(&before, "data-updated").is_some(),
        "the page never loaded its data:\n{before}"
    );
    assert!(!before.contains("class=\"result\""), "{before}");
    assert!(before.contains("No results yet."), "{before}");

    let good = work.path().join("good");
    let truth = synth(&good, 64, 16, &["--seed", "21"]);
    let mut modify = dcmtk("dcmodify");
    modify.arg("-nb");
    for (tag, value) in DEMOGRAPHICS {
        modify.args(["-i", &format!("{tag}={value}")]);
    }
    modify.args(dicom_files(&good));
    run_ok(modify, "dcmodify");
    let bad = work.path().join("bad");
    let bad_truth = synth(&bad, 32, 6, &["--seed", "22"]);
    poison(&bad, "2.25.98765432109876543211");
    send(dicom_port, &good);
    send(dicom_port, &bad);

    let summary = data.join(format!("results/{}/{MODEL}/summary.json", truth.series_uid));
    wait_for("the result", Duration::from_secs(180), || {
        run.assert_running();
        summary.is_file().then_some(())
    });
    wait_for("the dead letter", Duration::from_secs(60), || {
        run.assert_running();
        let (_, body) = http_get(http_port, "/dlq")?;
        body.contains(&bad_truth.series_uid).then_some(())
    });

    // The page, as a browser renders it: the result row with its preview loaded
    // (the script records the image's natural width once it decoded it) and label
    // volumes, and the dead letter with its code.
    let after = browse(&chromium, &profile, &url, &["--dump-dom"]);
    let result = row(&after, &format!("data-series=\"{}\"", truth.series_uid))
        .filter(|r| r.contains("class=\"result\""))
        .unwrap_or_else(|| panic!("no result row for the series:\n{after}"));
    assert_eq!(attr(result, "data-model"), Some(MODEL), "{result}");
    assert!(result.contains("<img"), "no preview in {result}");
    assert_eq!(
        attr(result, "data-loaded"),
        Some("true"),
        "preview not loaded: {result}"
    );
    let width: u32 = attr(result, "data-natural-width")
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(width > 0, "preview without width: {result}");
    assert!(result.contains(" mL</li>"), "no label volumes in {result}");
    assert!(result.contains(">CT<"), "no modality in {result}");
    let dead =
        row(&after, "class=\"dead-letter\"").unwrap_or_else(|| panic!("no dead letter:\n{after}"));
    assert!(dead.contains(&bad_truth.series_uid), "{dead}");
    // The preview the page loaded is the one in the store.
    let stored =
        std::fs::read(data.join(format!("results/{}/{MODEL}/preview.png", truth.series_uid)))
            .unwrap();
    assert_eq!(png_size(&stored).map(|s| s.0), Some(width));

    // No demographics, neither on the page nor in the data behind it.
    let (code, overview) = http_get(http_port, "/ui/overview.json").unwrap();
    assert_eq!(code, 200, "{overview}");
    let view: serde_json::Value = serde_json::from_str(&overview).unwrap();
    assert!(
        view["results"][0]["took_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "no inferer time: {overview}"
    );
    for (tag, value) in DEMOGRAPHICS {
        for part in value.split('^') {
            assert!(!after.contains(part), "{tag} {part} on the page");
            assert!(!overview.contains(part), "{tag} {part} in overview.json");
        }
    }

    let shot = artifacts.join("result.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chromium,
        &profile,
        &url,
        &[
            "--window-size=1280,900",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert_eq!(png_size(&png), Some((1280, 900)), "not a 1280×900 PNG");
    println!("screenshot of the page: {}", shot.display());
}
