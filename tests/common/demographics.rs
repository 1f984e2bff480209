//! A study full of recognisable demographics, and the search for them in what radflow
//! writes: the patient-data and de-identification tests share both.

use std::path::Path;

use super::{dcmtk, dicom_files, run_ok};

/// The demographics written into every instance, and how each could leak in another
/// spelling (a date reformatted, a name split at its component separator).
pub const DEMOGRAPHICS: &[(&str, &str, &[&str])] = &[
    (
        "(0010,0010)",
        "Zwetschgenbaum^Hildegard",
        &["Zwetschgenbaum", "Hildegard"],
    ),
    ("(0010,0020)", "PID-83746251", &["83746251"]),
    ("(0010,0030)", "19410317", &["19410317", "1941-03-17"]),
    ("(0008,0050)", "ACC99283715", &["99283715"]),
    (
        "(0008,0090)",
        "Quackenbush^Eberhard",
        &["Quackenbush", "Eberhard"],
    ),
    (
        "(0008,0080)",
        "Sankt Ottilien Klinikum",
        &["Ottilien", "Klinikum"],
    ),
    ("(0010,1040)", "Brombeerweg 17", &["Brombeerweg"]),
    ("(0010,2154)", "0171-5550199", &["5550199"]),
];

/// Writes the demographics into every file of `dir` with DCMTK's dcmodify (inserting
/// the attributes the phantom lacks, replacing the ones it has).
pub fn add_demographics(dir: &Path) {
    let files = dicom_files(dir);
    let mut cmd = dcmtk("dcmodify");
    cmd.arg("-nb");
    for (tag, value, _) in DEMOGRAPHICS {
        cmd.args(["-i", &format!("{tag}={value}")]);
    }
    cmd.args(&files);
    run_ok(cmd, "dcmodify");
}

/// Every needle that must not appear anywhere outside the DICOM files.
pub fn needles() -> Vec<&'static str> {
    let mut all = Vec::new();
    for (_, value, parts) in DEMOGRAPHICS {
        all.push(*value);
        all.extend(parts.iter().copied());
    }
    all
}

/// The needles found in `haystack`, searched as bytes (case-insensitive for ASCII) so
/// that binary files (NIfTI headers, gzip, PNG text chunks) are searched too.
pub fn found_in(haystack: &[u8]) -> Vec<&'static str> {
    let lower = haystack.to_ascii_lowercase();
    needles()
        .into_iter()
        .filter(|n| {
            let n = n.to_ascii_lowercase();
            let n = n.as_bytes();
            lower.windows(n.len()).any(|w| w == n)
        })
        .collect()
}
