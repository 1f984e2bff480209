//! Decompressing the prepared volumes (`volume.nii.gz`) on every core.
//!
//! Inflating a 300-slice CT takes longer than running the demo model on it when it is
//! done on one core, as any gzip reader does: a deflate stream is sequential. The
//! [`nifti`] writer, however, writes volumes as one gzip member whose deflate stream
//! is made of independently compressed 1 MiB blocks, each ended by a sync flush (an empty
//! stored block, the bytes `00 00 FF FF` on a byte boundary), and records in the gzip
//! header's extra field where each block lies and how long it is inflated
//! ([`nifti::BLOCK_INDEX_ID`]). [`gunzip`] inflates such blocks in parallel, each
//! straight into its place in the output, and checks the result against the member's
//! CRC-32 and length. A stream without the index (another writer) is split at the
//! sync-flush markers instead; one that does not split either way (a marker that was
//! really data, a damaged index) fails the checks and is inflated sequentially: the
//! result is always exactly what a sequential reader gives.

use flate2::{Crc, Decompress, FlushDecompress, Status};
use rayon::prelude::*;

use crate::Volume;
use crate::nifti::{self, NiftiError, NiftiScalar};

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
/// parallel when its header indexes its blocks or its deflate stream splits at sync
/// flushes, sequentially otherwise.
pub fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let (start, end) = member_bounds(bytes)?;
    let trailer = &bytes[bytes.len() - 8..];
    let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
    let deflate = &bytes[start..end];
    if let Some(out) = block_index(bytes).and_then(|index| indexed(deflate, index, crc, size)) {
        return Some(out);
    }
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
        at += 2 + extra_field(bytes)?.len();
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

/// The gzip header's extra field, if it has one that fits the stream.
fn extra_field(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < 12 || bytes[3] & 0x04 == 0 {
        return None;
    }
    let len = usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
    bytes.get(12..12 + len)
}

/// The data of the [`nifti::BLOCK_INDEX_ID`] subfield of the extra field, if present.
fn block_index(bytes: &[u8]) -> Option<&[u8]> {
    let mut field = extra_field(bytes)?;
    while field.len() >= 4 {
        let len = usize::from(u16::from_le_bytes([field[2], field[3]]));
        let data = field.get(4..4 + len)?;
        if field[..2] == nifti::BLOCK_INDEX_ID {
            return Some(data);
        }
        field = &field[4 + len..];
    }
    None
}

/// Most bytes one deflate byte can inflate to (a length-258 match in under two bits).
const MAX_RATIO: usize = 1032;

/// Inflates the blocks listed by `index` in parallel, each into its own slice of the
/// output; `None` unless the index tiles the stream exactly and the result matches
/// `crc` and `size`. Every claimed length is checked before anything is allocated.
fn indexed(deflate: &[u8], index: &[u8], crc: u32, size: u32) -> Option<Vec<u8>> {
    let (&version, entries) = index.split_first()?;
    if version != 1 || entries.is_empty() || entries.len() % 8 != 0 {
        return None;
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    let blocks: Vec<(usize, usize)> = entries
        .chunks_exact(8)
        .map(|e| (u32_at(&e[..4]), u32_at(&e[4..])))
        .collect();
    let deflated: usize = blocks.iter().map(|b| b.0).sum();
    let total: usize = blocks.iter().map(|b| b.1).sum();
    if deflated != deflate.len()
        || total as u32 != size
        || blocks
            .iter()
            .any(|&(d, r)| r > d.saturating_mul(MAX_RATIO).saturating_add(1024))
    {
        return None;
    }
    let mut out = vec![0u8; total];
    let mut jobs = Vec::with_capacity(blocks.len());
    let (mut input, mut output) = (deflate, out.as_mut_slice());
    for (i, &(d, r)) in blocks.iter().enumerate() {
        let (piece, rest_in) = input.split_at(d);
        let (slot, rest_out) = output.split_at_mut(r);
        jobs.push((piece, slot, i + 1 == blocks.len()));
        (input, output) = (rest_in, rest_out);
    }
    let crcs: Vec<Crc> = jobs
        .into_par_iter()
        .map(|(piece, slot, last)| {
            inflate_into(piece, slot, last)?;
            let mut crc = Crc::new();
            crc.update(slot);
            Some(crc)
        })
        .collect::<Option<_>>()?;
    let mut check = Crc::new();
    for part in &crcs {
        check.combine(part);
    }
    (check.sum() == crc).then_some(out)
}

/// Inflates one block of raw deflate data into exactly `out`; `Some` only if the block
/// fills it, is used up, and ends the stream exactly when it is the `last`.
fn inflate_into(input: &[u8], out: &mut [u8], last: bool) -> Option<()> {
    let mut d = Decompress::new(false);
    loop {
        let (read, written) = (d.total_in() as usize, d.total_out() as usize);
        let status = d
            .decompress(&input[read..], &mut out[written..], FlushDecompress::Sync)
            .ok()?;
        let (now_read, now_written) = (d.total_in() as usize, d.total_out() as usize);
        let used_up = now_read == input.len() && now_written == out.len();
        match status {
            Status::StreamEnd => return (last && used_up).then_some(()),
            _ if used_up && !last => return Some(()),
            _ if now_read == read && now_written == written => return None,
            _ => {}
        }
    }
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
    let pieces: Vec<Vec<u8>> = pieces.into_iter().collect::<Option<_>>()?;
    let total: usize = pieces.iter().map(Vec::len).sum();
    if total as u32 != size {
        return None;
    }
    // Each piece is checksummed and copied into place on its own core; the CRCs combine.
    let mut out = vec![0u8; total];
    let mut slots = Vec::with_capacity(pieces.len());
    let mut rest = out.as_mut_slice();
    for piece in &pieces {
        let (slot, tail) = rest.split_at_mut(piece.len());
        slots.push(slot);
        rest = tail;
    }
    let crcs: Vec<Crc> = slots
        .into_par_iter()
        .zip(pieces.par_iter())
        .map(|(slot, piece)| {
            slot.copy_from_slice(piece);
            let mut crc = Crc::new();
            crc.update(piece);
            crc
        })
        .collect();
    let mut check = Crc::new();
    for part in &crcs {
        check.combine(part);
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
    // The trailer's size (modulo 4 GiB, and only a claim) saves the regrowing; it is
    // capped by what deflate could expand these bytes to in practice.
    let claimed = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(claimed.min(bytes.len().saturating_mul(16)));
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
        let grid = crate::Grid {
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
        for level in [0, 1] {
            let gz = nifti::write_nifti_gz_level(&volume, "test", level);
            let (start, end) = member_bounds(&gz).unwrap();
            let trailer = &gz[gz.len() - 8..];
            let crc = u32::from_le_bytes(trailer[..4].try_into().unwrap());
            let size = u32::from_le_bytes(trailer[4..].try_into().unwrap());
            let whole = sequential(&gz).unwrap();
            let index = block_index(&gz).expect("the writer records its blocks");
            let by_index = indexed(&gz[start..end], index, crc, size).expect("the index applies");
            assert_eq!(by_index, whole, "level {level}");
            if level == 1 {
                // Compressed blocks can also be found by their sync markers.
                let split = parallel(&gz[start..end], crc, size).expect("the marker path applies");
                assert_eq!(split, whole);
            }
            assert_eq!(read_volume::<f32>(&gz).unwrap(), volume);
        }
    }

    /// Rewrites entry `entry` of the block index of `gz` (deflate and raw lengths).
    fn set_entry(gz: &mut [u8], entry: usize, deflated: u32, raw: u32) {
        let at = 17 + 8 * entry;
        gz[at..at + 4].copy_from_slice(&deflated.to_le_bytes());
        gz[at + 4..at + 8].copy_from_slice(&raw.to_le_bytes());
    }

    fn entry(gz: &[u8], entry: usize) -> (u32, u32) {
        let at = 17 + 8 * entry;
        let u = |o: usize| u32::from_le_bytes(gz[o..o + 4].try_into().unwrap());
        (u(at), u(at + 4))
    }

    #[test]
    fn a_wrong_block_index_is_never_trusted() {
        let input = data(3 << 20);
        let values: Vec<f32> = input.iter().map(|&b| f32::from(b)).collect();
        let grid = crate::Grid {
            dims: [256, 256, 12],
            affine: [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let data =
            ndarray::Array3::from_shape_vec((12, 256, 256), values[..256 * 256 * 12].to_vec())
                .unwrap();
        let volume = Volume::new(grid, data).unwrap();
        let good = nifti::write_nifti_gz_level(&volume, "test", 1);
        let whole = sequential(&good).unwrap();
        let (start, end) = member_bounds(&good).unwrap();
        let check = |gz: &[u8]| {
            let trailer = &gz[gz.len() - 8..];
            let crc = u32::from_le_bytes(trailer[..4].try_into().unwrap());
            let size = u32::from_le_bytes(trailer[4..].try_into().unwrap());
            indexed(&gz[start..end], block_index(gz).unwrap(), crc, size)
        };
        assert_eq!(check(&good).as_deref(), Some(&whole[..]));
        let (d0, r0) = entry(&good, 0);
        let (d1, r1) = entry(&good, 1);
        // A boundary moved (the lengths still tile the stream and the image).
        let mut moved = good.clone();
        set_entry(&mut moved, 0, d0 - 1, r0);
        set_entry(&mut moved, 1, d1 + 1, r1);
        // Raw lengths swapped between blocks of different sizes.
        let mut swapped = good.clone();
        set_entry(&mut swapped, 0, d0, r0 + 4);
        set_entry(&mut swapped, 1, d1, r1 - 4);
        // A raw length far beyond what its deflate bytes can hold.
        let mut bomb = good.clone();
        set_entry(&mut bomb, 0, d0, u32::MAX);
        // An unknown version.
        let mut version = good.clone();
        version[16] = 2;
        for (name, gz) in [
            ("moved", moved),
            ("swapped", swapped),
            ("bomb", bomb),
            ("version", version),
        ] {
            assert!(check(&gz).is_none(), "{name}: the index is rejected");
            // The reader still returns exactly the data, by another path.
            assert_eq!(gunzip(&gz).unwrap(), whole, "{name}");
        }
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
