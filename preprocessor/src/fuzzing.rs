//! Entry points for the fuzz targets (`fuzz/`) and for the corpus replay that CI runs
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes and must return an error, not
//! panic, hang or allocate without bound, on anything it cannot use.

use crate::convert::volume_from_files;
use crate::decode::{read_frames, read_header, read_slice};
use crate::geometry::GeometryOptions;

/// One file: its header, its first frame and all its frames (every codec the
/// transfer syntax names: native, RLE, JPEG lossless and extended, JPEG-LS, JPEG 2000,
/// Siemens mosaics).
pub fn file(data: &[u8]) {
    let _ = read_header(data);
    let _ = read_slice(data);
    let _ = read_frames(data);
}

/// The JPEG decoders of the preprocessor's own (lossless process 14, extended 12-bit)
/// on one codestream; the first three bytes give the expected rows, columns and
/// sample size.
pub fn jpeg(data: &[u8]) {
    let [r, c, b, stream @ ..] = data else {
        return;
    };
    let (rows, cols) = (usize::from(*r % 64) + 1, usize::from(*c % 64) + 1);
    let bytes_per_sample = 1 + usize::from(*b & 1);
    let mut out = Vec::new();
    let _ = crate::jpeg_lossless::decode(stream, rows, cols, bytes_per_sample, &mut out);
    let _ = crate::jpeg_extended::decode(stream, rows, cols, bytes_per_sample, &mut out);
}

/// A Siemens CSA header (the mosaic's slice count and normal).
pub fn csa(data: &[u8]) {
    let _ = crate::mosaic::parse_csa(data);
}

/// Marks the end of one file and the start of the next in a [`series`] input.
pub const FILE_SEPARATOR: &[u8] = b"\xFF\xFE\xFD\xFCnext";

/// Series building: the input cut at [`FILE_SEPARATOR`] into at most 16 files, turned
/// into one volume (selection, ordering, spacing, gaps, assembly).
pub fn series(data: &[u8]) {
    let mut files = Vec::new();
    let mut rest = data;
    while files.len() < 16 {
        match find(rest, FILE_SEPARATOR) {
            Some(at) => {
                files.push((format!("{}.dcm", files.len()), &rest[..at]));
                rest = &rest[at + FILE_SEPARATOR.len()..];
            }
            None => {
                files.push((format!("{}.dcm", files.len()), rest));
                break;
            }
        }
    }
    let _ = volume_from_files(files, &GeometryOptions::default());
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
