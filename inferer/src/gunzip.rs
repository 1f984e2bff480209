//! Decompressing the prepared volumes (`volume.nii.gz`) on every core.
//!
//! Inflating a 300-slice CT takes longer than running the demo model on it when it is
//! done on one core, as any gzip reader does: a deflate stream is sequential. The
//! preprocessor, however, writes its volumes as one gzip member whose deflate stream is
//! made of independently compressed 1 MiB blocks, each ended by a sync flush (an empty
//! stored block, the bytes `00 00 FF FF` on a byte boundary). Every such block can be
//! inflated on its own, so [`gunzip`] splits the stream at those markers, inflates the
//! pieces in parallel and checks the result against the member's CRC-32 and length.
//! Any stream that does not split this way (another writer, a marker that was really
//! data) fails the checks and is inflated sequentially instead: the result is always
//! exactly what a sequential reader gives.

use flate2::{Crc, Decompress, FlushDecompress, Status};
use radflow_preprocessor::nifti::{self, NiftiError, NiftiScalar};
use radflow_preprocessor::volume::Volume;
use rayon::prelude::*;

/// The sync-flush marker: LEN = 0, NLEN = 0xFFFF of an empty stored block.
const SYNC: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Pieces smaller than this are not worth a task of their own.
const MIN_PIECE: usize = 64 << 10;

/// Reads a `.nii` or `.nii.gz` volume, inflating a compressed one with [`gunzip`].
pub fn read_volume<T: NiftiScalar>(bytes: &[u8]) -> Result<Volume<T>, NiftiError> {
    match gunzip(bytes) {
        Some(plain) => nifti::read_nifti(&plain),
        // Not gzip, or damaged: the reader says what is wrong.
        None => nifti::read_nifti(bytes),
    }
}

/// The decompressed content of `bytes` if it is a gzip stream (else `None`): in
/// parallel when its deflate stream splits at sync flushes, sequentially otherwise.
pub fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let (start, end) = member_bounds(bytes)?;
    let trailer = &bytes[bytes.len() - 8..];
    let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
    let deflate = &bytes[start..end];
    if let Some(out) = parallel(deflate, crc, size) {
        return Some(out);
    }
    sequential(bytes)
}

/// Where the deflate data of a single-member gzip stream starts and ends, if `bytes`
/// is one (header flags are honoured; the 8-byte trailer follows the data).
fn member_bounds(bytes: &[u8]) -> Option<(usize, usize)> {
    if bytes.len() < 18 || bytes[..3] != [0x1f, 0x8b, 8] {
        return None;
    }
    let flags = bytes[3];
    let mut at = 10;
    if flags & 0x04 != 0 {
        let extra = usize::from(u16::from_le_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]));
        at += 2 + extra;
    }
    for flag in [0x08, 0x10] {
        if flags & flag != 0 {
            at += bytes.get(at..)?.iter().position(|&b| b == 0)? + 1;
        }
    }
    if flags & 0x02 != 0 {
        at += 2;
    }
    (at + 8 <= bytes.len()).then_some((at, bytes.len() - 8))
}

/// Splits `deflate` after every sync marker into pieces of at least `MIN_PIECE`,
/// inflates them in parallel and checks the whole against `crc` and `size`.
fn parallel(deflate: &[u8], crc: u32, size: u32) -> Option<Vec<u8>> {
    let finder = memchr::memmem::Finder::new(&SYNC);
    let mut cuts = vec![0];
    for at in finder.find_iter(deflate) {
        let next = at + SYNC.len();
        if next - cuts.last().expect("starts with 0") >= MIN_PIECE && next < deflate.len() {
            cuts.push(next);
        }
    }
    if cuts.len() < 2 {
        return None;
    }
    cuts.push(deflate.len());
    let pieces: Vec<Option<Vec<u8>>> = cuts
        .par_windows(2)
        .enumerate()
        .map(|(i, w)| inflate(&deflate[w[0]..w[1]], i + 2 == cuts.len()))
        .collect();
    let total: usize = pieces
        .iter()
        .map(|p| p.as_ref().map(Vec::len))
        .sum::<Option<usize>>()?;
    if total as u32 != size {
        return None;
    }
    let mut out = Vec::with_capacity(total);
    let mut check = Crc::new();
    for piece in pieces.into_iter().flatten() {
        check.update(&piece);
        out.extend_from_slice(&piece);
    }
    (check.sum() == crc).then_some(out)
}

/// Inflates one piece of raw deflate data that ends on a block boundary (`last`: the
/// end of the stream); `None` if it is not such a piece.
fn inflate(input: &[u8], last: bool) -> Option<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(input.len() * 4 + 1024);
    loop {
        let consumed = d.total_in() as usize;
        let produced = out.len();
        let status = d
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .ok()?;
        let done = d.total_in() as usize == input.len();
        match status {
            Status::StreamEnd => return (last && done).then_some(out),
            _ if done && out.len() < out.capacity() => return (!last).then_some(out),
            _ => {}
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        } else if d.total_in() as usize == consumed && out.len() == produced {
            return None;
        }
    }
}

/// Any gzip stream, one core.
fn sequential(bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn data(n: usize) -> Vec<u8> {
        // Compressible but not trivially: a slow ramp with a little noise.
        let mut state = 7u32;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((i / 97) as u8).wrapping_add((state >> 29) as u8)
            })
            .collect()
    }

    /// A stream written the preprocessor's way: blocks deflated independently, each
    /// ended with a sync flush, the last finished, in one gzip member.
    fn blockwise(input: &[u8], block: usize) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        let blocks: Vec<&[u8]> = input.chunks(block).collect();
        for (i, b) in blocks.iter().enumerate() {
            let mut c = flate2::Compress::new(flate2::Compression::new(1), false);
            let mut part = Vec::with_capacity(b.len() + 1024);
            let flush = if i + 1 == blocks.len() {
                flate2::FlushCompress::Finish
            } else {
                flate2::FlushCompress::Sync
            };
            loop {
                let status = c
                    .compress_vec(&b[c.total_in() as usize..], &mut part, flush)
                    .unwrap();
                if status == flate2::Status::StreamEnd
                    || (flush == flate2::FlushCompress::Sync
                        && c.total_in() as usize == b.len()
                        && part.len() < part.capacity())
                {
                    break;
                }
                part.reserve(part.capacity());
            }
            out.extend_from_slice(&part);
        }
        let mut crc = Crc::new();
        crc.update(input);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&(input.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn blockwise_streams_are_split_and_equal_the_sequential_result() {
        let input = data(5 << 20);
        let gz = blockwise(&input, 1 << 20);
        let (start, end) = member_bounds(&gz).unwrap();
        assert!(
            parallel(&gz[start..end], Crc::new().sum(), 0).is_none(),
            "checks hold"
        );
        let mut crc = Crc::new();
        crc.update(&input);
        let split = parallel(&gz[start..end], crc.sum(), input.len() as u32).unwrap();
        assert_eq!(split, input);
        assert_eq!(gunzip(&gz).unwrap(), input);
        assert_eq!(sequential(&gz).unwrap(), input);
    }

    #[test]
    fn volumes_written_by_the_preprocessor_are_inflated_in_parallel() {
        let grid = radflow_preprocessor::volume::Grid {
            dims: [64, 64, 160],
            affine: [
                [1.5, 0.0, 0.0, 0.0],
                [0.0, 1.5, 0.0, 0.0],
                [0.0, 0.0, 1.5, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let values: Vec<f32> = data(64 * 64 * 160).into_iter().map(f32::from).collect();
        let data = ndarray::Array3::from_shape_vec((160, 64, 64), values).unwrap();
        let volume = Volume::new(grid, data).unwrap();
        let gz = nifti::write_nifti_gz(&volume, "test");
        let (start, end) = member_bounds(&gz).unwrap();
        let trailer = &gz[gz.len() - 8..];
        let crc = u32::from_le_bytes(trailer[..4].try_into().unwrap());
        let size = u32::from_le_bytes(trailer[4..].try_into().unwrap());
        let split = parallel(&gz[start..end], crc, size).expect("the parallel path applies");
        assert_eq!(split, sequential(&gz).unwrap());
        assert_eq!(read_volume::<f32>(&gz).unwrap(), volume);
    }

    #[test]
    fn other_gzip_streams_fall_back_to_one_core() {
        let input = data(3 << 20);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&input).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip(&gz).unwrap(), input);
        // A stream with header fields (file name) and a damaged one.
        let mut named = flate2::GzBuilder::new()
            .filename("volume.nii")
            .write(Vec::new(), flate2::Compression::fast());
        named.write_all(&input).unwrap();
        assert_eq!(gunzip(&named.finish().unwrap()).unwrap(), input);
        let mut broken = blockwise(&input, 1 << 20);
        let n = broken.len();
        broken[n / 2] ^= 0x55;
        assert!(gunzip(&broken).is_none_or(|out| out != input));
        assert!(gunzip(b"not gzip").is_none());
    }
}
