//! NIfTI-1 single-file images (`.nii`, `.nii.gz`) written and read in memory.
//!
//! radflow streams volumes to object storage, so files are produced as byte buffers
//! rather than paths. The writer emits a 348-byte little-endian header, an empty
//! extension flag and the voxel data at offset 352, with both transforms set:
//! - the **sform** (code 1, scanner) holds the affine exactly (as `f32`);
//! - the **qform** (code 1) holds the nearest rigid rotation as a quaternion, with the
//!   handedness in `qfac = pixdim[0]`. For a sheared grid (tilted gantry) only the
//!   sform is exact; readers such as nibabel prefer the sform.
//!
//! Compressed output is one gzip member, deflated in parallel: each block of the stream
//! is compressed independently and ended with a sync flush, so the blocks concatenate
//! into one valid deflate stream. Any gzip reader decodes it. Level 0 keeps that
//! layout with stored (uncompressed) deflate blocks: still a `.nii.gz` every reader
//! opens, but written and read at the speed of a copy.
//!
//! The reader accepts u8, i16, u16, i32, f32 and f64 data (either byte order), applies
//! `scl_slope`/`scl_inter` when reading into a float type, and validates every size
//! against the bytes present before allocating for the data.

use std::io::Read;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use ndarray::Array3;
use rayon::prelude::*;

use crate::{Grid, Volume};

const HEADER_SIZE: usize = 348;
const VOX_OFFSET: usize = 352;
/// Bytes of voxel data deflated per parallel block.
const BLOCK: usize = 1 << 20;
/// Default gzip level for written volumes: speed matters more than the last percent
/// of size.
pub const GZIP_LEVEL: u32 = 1;

/// A voxel type NIfTI can store.
pub trait NiftiScalar: Copy + Default + Send + Sync + 'static {
    /// NIfTI `datatype` code.
    const DATATYPE: i16;
    /// Bytes per voxel.
    const SIZE: usize;
    /// Whether `scl_slope`/`scl_inter` are applied when reading into this type.
    const IS_FLOAT: bool;
    /// Writes the value little-endian into `out` (`SIZE` bytes).
    fn write_le(self, out: &mut [u8]);
    /// Reads a value from `SIZE` bytes.
    fn read(bytes: &[u8], big_endian: bool) -> Self;
    /// Widening conversion used when converting between datatypes.
    fn to_f64(self) -> f64;
    /// Conversion from another datatype (rounds and saturates for integers).
    fn from_f64(v: f64) -> Self;
}

macro_rules! scalar {
    ($t:ty, $code:expr, $float:expr, $from:expr) => {
        impl NiftiScalar for $t {
            const DATATYPE: i16 = $code;
            const SIZE: usize = std::mem::size_of::<$t>();
            const IS_FLOAT: bool = $float;
            #[inline]
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn read(bytes: &[u8], big_endian: bool) -> Self {
                let b = bytes.try_into().expect("SIZE bytes");
                if big_endian {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                }
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                let f: fn(f64) -> $t = $from;
                f(v)
            }
        }
    };
}

scalar!(u8, 2, false, |v| v.round() as u8);
scalar!(i16, 4, false, |v| v.round() as i16);
scalar!(i32, 8, false, |v| v.round() as i32);
scalar!(f32, 16, true, |v| v as f32);
scalar!(f64, 64, true, |v| v);
scalar!(u16, 512, false, |v| v.round() as u16);

/// Why bytes could not be read as a NIfTI-1 image.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    /// Not a single-file NIfTI-1 image.
    #[error("not a single-file NIfTI-1 image: {0}")]
    NotNifti(String),
    /// A valid header this reader does not handle.
    #[error("unsupported NIfTI image: {0}")]
    Unsupported(String),
    /// Fewer data bytes than the header declares.
    #[error("NIfTI data is truncated: {expected} bytes expected, {present} present")]
    Truncated { expected: usize, present: usize },
    /// The gzip stream is corrupt.
    #[error("the gzip stream is corrupt: {0}")]
    Gzip(#[from] std::io::Error),
}

/// Serialises `vol` as an uncompressed `.nii`.
///
/// # Panics
/// If an axis has more than 32767 voxels, the NIfTI-1 limit.
pub fn write_nifti<T: NiftiScalar>(vol: &Volume<T>, description: &str) -> Vec<u8> {
    let header = header_bytes::<T>(&vol.grid, description);
    let data = vol.data.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let mut out = vec![0u8; VOX_OFFSET + data.len() * T::SIZE];
    out[..HEADER_SIZE].copy_from_slice(&header);
    out[VOX_OFFSET..]
        .par_chunks_mut(BLOCK / T::SIZE * T::SIZE)
        .zip(data.par_chunks(BLOCK / T::SIZE))
        .for_each(|(bytes, values)| {
            for (b, v) in bytes.chunks_exact_mut(T::SIZE).zip(values) {
                v.write_le(b);
            }
        });
    out
}

/// Serialises `vol` as a gzip-compressed `.nii.gz` at [`GZIP_LEVEL`] (see the module
/// docs).
///
/// # Panics
/// As [`write_nifti`].
pub fn write_nifti_gz<T: NiftiScalar>(vol: &Volume<T>, description: &str) -> Vec<u8> {
    write_nifti_gz_level(vol, description, GZIP_LEVEL)
}

/// Serialises `vol` as a `.nii.gz` at gzip `level` (0 = stored blocks, 1–9; higher
/// levels are clamped to 9).
///
/// # Panics
/// As [`write_nifti`].
pub fn write_nifti_gz_level<T: NiftiScalar>(
    vol: &Volume<T>,
    description: &str,
    level: u32,
) -> Vec<u8> {
    let level = level.min(9);
    let header = header_bytes::<T>(&vol.grid, description);
    let data = vol.data.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let per_block = BLOCK / T::SIZE;
    let blocks = data.len().div_ceil(per_block).max(1);

    // Block 0 carries the header; every block converts its values to bytes locally.
    let parts: Vec<(Vec<u8>, Crc)> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let values =
                &data[(b * per_block).min(data.len())..((b + 1) * per_block).min(data.len())];
            let mut raw = Vec::with_capacity(values.len() * T::SIZE + VOX_OFFSET);
            if b == 0 {
                raw.extend_from_slice(&header);
                raw.extend_from_slice(&[0; VOX_OFFSET - HEADER_SIZE]);
            }
            let start = raw.len();
            raw.resize(start + values.len() * T::SIZE, 0);
            for (bytes, v) in raw[start..].chunks_exact_mut(T::SIZE).zip(values) {
                v.write_le(bytes);
            }
            let mut crc = Crc::new();
            crc.update(&raw);
            (deflate_block(&raw, b + 1 == blocks, level), crc)
        })
        .collect();

    let compressed: usize = parts.iter().map(|(p, _)| p.len()).sum();
    let index = block_index(&parts);
    let mut out = Vec::with_capacity(compressed + 18 + index.len());
    if index.is_empty() {
        // gzip member header: deflate, no flags, no mtime, unknown OS.
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    } else {
        // The same with FEXTRA: the block index as an extra field.
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff]);
        out.extend_from_slice(&(index.len() as u16).to_le_bytes());
        out.extend_from_slice(&index);
    }
    let mut crc = Crc::new();
    for (part, part_crc) in &parts {
        out.extend_from_slice(part);
        crc.combine(part_crc);
    }
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    out
}

/// Subfield ID of the gzip extra field in which [`write_nifti_gz_level`] records
/// where its independently deflated blocks lie, so that a reader can inflate them in
/// parallel without searching the stream. Its data: a version byte (1), then per block
/// the deflate bytes and the uncompressed bytes as little-endian `u32`s. Readers that
/// do not know it skip it, as RFC 1952 requires.
pub const BLOCK_INDEX_ID: [u8; 2] = *b"RF";

/// The gzip extra field (one [`BLOCK_INDEX_ID`] subfield) for `parts`, or nothing when
/// it would not fit the field's 65535 bytes (volumes above about 8 GiB).
fn block_index(parts: &[(Vec<u8>, Crc)]) -> Vec<u8> {
    let len = 1 + 8 * parts.len();
    if parts.len() < 2 || len + 4 > usize::from(u16::MAX) {
        return Vec::new();
    }
    let mut field = Vec::with_capacity(4 + len);
    field.extend_from_slice(&BLOCK_INDEX_ID);
    field.extend_from_slice(&(len as u16).to_le_bytes());
    field.push(1);
    for (deflated, crc) in parts {
        field.extend_from_slice(&(deflated.len() as u32).to_le_bytes());
        field.extend_from_slice(&crc.amount().to_le_bytes());
    }
    field
}

/// Raw deflate of one block; a sync flush ends inner blocks on a byte boundary so that
/// blocks concatenate, the last block finishes the stream.
fn deflate_block(input: &[u8], last: bool, level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    // Stored blocks add 5 bytes per 64 KiB; compressed ones are rarely above half.
    let room = if level == 0 {
        input.len() + input.len() / 16_384 + 1024
    } else {
        input.len() / 2 + 1024
    };
    let mut out = Vec::with_capacity(room);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&input[consumed..], &mut out, flush)
            .expect("deflate of in-memory data cannot fail");
        let done_input = c.total_in() as usize == input.len();
        let room_left = out.len() < out.capacity();
        match status {
            Status::StreamEnd => break,
            _ if !last && done_input && room_left => break,
            _ => out.reserve(out.capacity().max(64 * 1024)),
        }
    }
    out
}

fn header_bytes<T: NiftiScalar>(grid: &Grid, description: &str) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    let put_i16 = |h: &mut [u8; HEADER_SIZE], off: usize, v: i16| {
        h[off..off + 2].copy_from_slice(&v.to_le_bytes())
    };
    let put_f32 = |h: &mut [u8; HEADER_SIZE], off: usize, v: f64| {
        h[off..off + 4].copy_from_slice(&(v as f32).to_le_bytes())
    };
    h[0..4].copy_from_slice(&(HEADER_SIZE as i32).to_le_bytes());
    h[38] = b'r';
    let dims = grid.dims.map(|d| {
        i16::try_from(d).unwrap_or_else(|_| panic!("axis of {d} voxels exceeds NIfTI-1's 32767"))
    });
    put_i16(&mut h, 40, 3);
    for (a, d) in dims.iter().enumerate() {
        put_i16(&mut h, 42 + 2 * a, *d);
    }
    for a in 3..7 {
        put_i16(&mut h, 42 + 2 * a, 1);
    }
    put_i16(&mut h, 70, T::DATATYPE);
    put_i16(&mut h, 72, (T::SIZE * 8) as i16);

    let q = QForm::from_affine(&grid.affine);
    let spacing = grid.spacing();
    let pixdim = [
        q.qfac, spacing[0], spacing[1], spacing[2], 1.0, 1.0, 1.0, 1.0,
    ];
    for (i, p) in pixdim.iter().enumerate() {
        put_f32(&mut h, 76 + 4 * i, *p);
    }
    put_f32(&mut h, 108, VOX_OFFSET as f64);
    put_f32(&mut h, 112, 1.0); // scl_slope: identity scaling
    h[123] = 2; // xyzt_units: millimetres, no time unit

    let desc = description.as_bytes();
    let mut n = desc.len().min(79);
    while !description.is_char_boundary(n) {
        n -= 1;
    }
    h[148..148 + n].copy_from_slice(&desc[..n]);

    put_i16(&mut h, 252, 1); // qform_code: scanner
    put_i16(&mut h, 254, 1); // sform_code: scanner
    for (i, v) in q.stored_bcd().iter().enumerate() {
        h[256 + 4 * i..260 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    for (i, v) in q.offset.iter().enumerate() {
        put_f32(&mut h, 268 + 4 * i, *v);
    }
    for r in 0..3 {
        for c in 0..4 {
            put_f32(&mut h, 280 + 16 * r + 4 * c, grid.affine[r][c]);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    h
}

/// Below this, `a² = 1 - b² - c² - d²` is rounding noise and `a` is taken as 0.
const A2_ZERO: f64 = 1e-7;

/// The qform parameters: rotation quaternion `(b, c, d)` (with `a >= 0` implied),
/// handedness `qfac` and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QForm {
    b: f64,
    c: f64,
    d: f64,
    qfac: f64,
    offset: [f64; 3],
}

impl QForm {
    /// Nearest rigid transform of an affine: columns normalised, then the closest
    /// orthogonal matrix (polar decomposition); a reflection goes into `qfac`.
    fn from_affine(a: &[[f64; 4]; 4]) -> Self {
        let mut m = [[0.0; 3]; 3];
        for c in 0..3 {
            let n = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
            for r in 0..3 {
                m[r][c] = if n > 0.0 {
                    a[r][c] / n
                } else if r == c {
                    1.0
                } else {
                    0.0
                };
            }
        }
        let mut q = nearest_orthogonal(m);
        let mut qfac = 1.0;
        if det3(&q) < 0.0 {
            qfac = -1.0;
            for row in q.iter_mut() {
                row[2] = -row[2];
            }
        }
        let (qa, b, c, d) = quaternion(&q);
        // NIfTI stores b, c, d and derives a = sqrt(1 - b² - c² - d²) >= 0.
        let s = if qa < 0.0 { -1.0 } else { 1.0 };
        QForm {
            b: s * b,
            c: s * c,
            d: s * d,
            qfac,
            offset: [a[0][3], a[1][3], a[2][3]],
        }
    }

    /// `(b, c, d)` as stored in `f32`. Readers derive `a = sqrt(1 - b² - c² - d²)`,
    /// which magnifies rounding when `a` is small (rotations near 180°, common after
    /// the LPS → RAS flip): the largest component is nudged by a few ulps so that the
    /// derived `a²` is as close as possible to the true one, and never below it when
    /// the true `a` is (nearly) zero, so that readers see an exact 180° rotation.
    fn stored_bcd(&self) -> [f32; 3] {
        let target = self.b * self.b + self.c * self.c + self.d * self.d;
        let near_half_turn = 1.0 - target < A2_ZERO;
        let q = [self.b as f32, self.c as f32, self.d as f32];
        let big = (0..3)
            .max_by(|&i, &j| q[i].abs().total_cmp(&q[j].abs()))
            .expect("three components");
        let score = |cand: &[f32; 3]| {
            let sum: f64 = cand.iter().map(|x| f64::from(*x).powi(2)).sum();
            let err = sum - target;
            if near_half_turn && err < 0.0 {
                1.0 - err
            } else {
                err.abs()
            }
        };
        let mut best = q;
        if q[big] == 0.0 {
            return best;
        }
        for step in -4i32..=4 {
            let mut cand = q;
            cand[big] = f32::from_bits(q[big].to_bits().wrapping_add_signed(step));
            if score(&cand) < score(&best) {
                best = cand;
            }
        }
        best
    }

    /// The affine this qform describes, for the given voxel spacing.
    fn to_affine(self, spacing: [f64; 3]) -> [[f64; 4]; 4] {
        let (mut b, mut c, mut d) = (self.b, self.c, self.d);
        let a2 = 1.0 - (b * b + c * c + d * d);
        let a = if a2 < A2_ZERO {
            // A 180° rotation: renormalise (b, c, d) instead of trusting f32 rounding.
            let n = (b * b + c * c + d * d).sqrt();
            (b, c, d) = (b / n, c / n, d / n);
            0.0
        } else {
            a2.sqrt()
        };
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let scale = [spacing[0], spacing[1], self.qfac * spacing[2]];
        let mut out = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                out[i][j] = r[i][j] * scale[j];
            }
            out[i][3] = self.offset[i];
        }
        out[3][3] = 1.0;
        out
    }
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Closest orthogonal matrix by the iteration `X ← (X + X⁻ᵀ) / 2`, which converges to
/// the orthogonal factor of the polar decomposition.
fn nearest_orthogonal(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut x = m;
    for _ in 0..100 {
        let det = det3(&x);
        if det.abs() < 1e-12 {
            // Degenerate (collinear axes): fall back to the identity rotation.
            return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        }
        // Inverse transpose = cofactor matrix / det.
        let cof = |r: usize, c: usize| {
            let (r0, r1) = ((r + 1) % 3, (r + 2) % 3);
            let (c0, c1) = ((c + 1) % 3, (c + 2) % 3);
            x[r0][c0] * x[r1][c1] - x[r0][c1] * x[r1][c0]
        };
        let mut next = [[0.0; 3]; 3];
        let mut change = 0.0f64;
        for r in 0..3 {
            for c in 0..3 {
                next[r][c] = 0.5 * (x[r][c] + cof(r, c) / det);
                change = change.max((next[r][c] - x[r][c]).abs());
            }
        }
        x = next;
        if change < 1e-15 {
            break;
        }
    }
    x
}

/// Unit quaternion `(a, b, c, d)` of a proper rotation matrix, from the NIfTI-1
/// rotation formula, choosing the largest component as pivot for accuracy.
fn quaternion(r: &[[f64; 3]; 3]) -> (f64, f64, f64, f64) {
    let trace = r[0][0] + r[1][1] + r[2][2];
    // 4a² = 1 + trace, 4b² = 1 + r00 - r11 - r22, and so on.
    let sq = [
        1.0 + trace,
        1.0 + r[0][0] - r[1][1] - r[2][2],
        1.0 - r[0][0] + r[1][1] - r[2][2],
        1.0 - r[0][0] - r[1][1] + r[2][2],
    ];
    let pivot = (0..4)
        .max_by(|&i, &j| sq[i].total_cmp(&sq[j]))
        .expect("four candidates");
    let p = 0.5 * sq[pivot].max(0.0).sqrt();
    let f = 0.25 / p;
    // Off-diagonal sums and differences: r21 - r12 = 4ab, r02 - r20 = 4ac,
    // r10 - r01 = 4ad, r01 + r10 = 4bc, r02 + r20 = 4bd, r12 + r21 = 4cd.
    let ab = r[2][1] - r[1][2];
    let ac = r[0][2] - r[2][0];
    let ad = r[1][0] - r[0][1];
    let bc = r[0][1] + r[1][0];
    let bd = r[0][2] + r[2][0];
    let cd = r[1][2] + r[2][1];
    match pivot {
        0 => (p, ab * f, ac * f, ad * f),
        1 => (ab * f, p, bc * f, bd * f),
        2 => (ac * f, bc * f, p, cd * f),
        _ => (ad * f, bd * f, cd * f, p),
    }
}

/// Parses a `.nii` or `.nii.gz` (detected by the gzip magic) into a volume of `T`.
pub fn read_nifti<T: NiftiScalar>(bytes: &[u8]) -> Result<Volume<T>, NiftiError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut gz = flate2::read::MultiGzDecoder::new(bytes);
        let mut head = vec![0u8; HEADER_SIZE];
        gz.read_exact(&mut head).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                NiftiError::NotNifti("the gzip stream is shorter than a NIfTI header".into())
            }
            _ => NiftiError::Gzip(e),
        })?;
        let h = Header::parse(&head)?;
        let needed = h.data_end()?;
        // Grow the buffer as data arrives rather than trusting the header's size.
        let mut all = head;
        gz.take((needed - HEADER_SIZE) as u64)
            .read_to_end(&mut all)?;
        h.volume(&all)
    } else {
        let h = Header::parse(bytes)?;
        h.volume(bytes)
    }
}

/// The header fields the reader uses.
#[derive(Debug)]
struct Header {
    big_endian: bool,
    dims: [usize; 3],
    datatype: i16,
    vox_offset: usize,
    slope: f64,
    inter: f64,
    affine: [[f64; 4]; 4],
}

impl Header {
    fn parse(b: &[u8]) -> Result<Self, NiftiError> {
        if b.len() < HEADER_SIZE {
            return Err(NiftiError::NotNifti(format!(
                "{} bytes is shorter than a NIfTI-1 header",
                b.len()
            )));
        }
        let big_endian = match (
            i32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            i32::from_be_bytes(b[0..4].try_into().expect("4 bytes")),
        ) {
            (348, _) => false,
            (_, 348) => true,
            _ => return Err(NiftiError::NotNifti("sizeof_hdr is not 348".into())),
        };
        if &b[344..348] != b"n+1\0" {
            return Err(NiftiError::NotNifti(
                "the magic is not \"n+1\" (a header/image pair is not supported)".into(),
            ));
        }
        let i16_at = |o: usize| i16::read(&b[o..o + 2], big_endian);
        let f32_at = |o: usize| f64::from(f32::read(&b[o..o + 4], big_endian));

        let ndim = i16_at(40);
        if !(1..=7).contains(&ndim) {
            return Err(NiftiError::NotNifti(format!("dim[0] = {ndim} is invalid")));
        }
        let mut dims = [1usize; 3];
        for a in 0..ndim as usize {
            let d = i16_at(42 + 2 * a);
            // dim[4..] may only be 1: one 3D volume.
            if d < 1 {
                return Err(NiftiError::NotNifti(format!(
                    "dim[{}] = {d} is invalid",
                    a + 1
                )));
            }
            if a >= 3 && d > 1 {
                return Err(NiftiError::Unsupported(format!(
                    "{ndim}-dimensional images are not supported (dim[{}] = {d})",
                    a + 1
                )));
            }
            if let Some(slot) = dims.get_mut(a) {
                *slot = d as usize;
            }
        }
        let datatype = i16_at(70);
        let vox_offset = f32_at(108);
        if !(vox_offset >= HEADER_SIZE as f64 && vox_offset.fract() == 0.0 && vox_offset < 1e9) {
            return Err(NiftiError::NotNifti(format!(
                "vox_offset {vox_offset} is invalid"
            )));
        }
        let pixdim: [f64; 8] = std::array::from_fn(|i| f32_at(76 + 4 * i));
        let spacing = [1, 2, 3].map(|i| if pixdim[i] > 0.0 { pixdim[i] } else { 1.0 });
        let qform_code = i16_at(252);
        let sform_code = i16_at(254);
        let affine = if sform_code > 0 {
            let mut a = [[0.0; 4]; 4];
            for (r, row) in a.iter_mut().take(3).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = f32_at(280 + 16 * r + 4 * c);
                }
            }
            a[3][3] = 1.0;
            a
        } else if qform_code > 0 {
            QForm {
                b: f32_at(256),
                c: f32_at(260),
                d: f32_at(264),
                qfac: if pixdim[0] < 0.0 { -1.0 } else { 1.0 },
                offset: [f32_at(268), f32_at(272), f32_at(276)],
            }
            .to_affine(spacing)
        } else {
            let mut a = [[0.0; 4]; 4];
            for i in 0..3 {
                a[i][i] = spacing[i];
            }
            a[3][3] = 1.0;
            a
        };
        Ok(Header {
            big_endian,
            dims,
            datatype,
            vox_offset: vox_offset as usize,
            slope: f32_at(112),
            inter: f32_at(116),
            affine,
        })
    }

    fn element_size(&self) -> Result<usize, NiftiError> {
        Ok(match self.datatype {
            2 => 1,
            4 | 512 => 2,
            8 | 16 => 4,
            64 => 8,
            other => {
                return Err(NiftiError::Unsupported(format!(
                    "datatype {other} (supported: uint8, int16, uint16, int32, float32, float64)"
                )));
            }
        })
    }

    /// Offset just past the voxel data, checked for overflow.
    fn data_end(&self) -> Result<usize, NiftiError> {
        let size = self.element_size()?;
        self.dims
            .iter()
            .try_fold(size, |acc, d| acc.checked_mul(*d))
            .and_then(|n| n.checked_add(self.vox_offset))
            .ok_or_else(|| NiftiError::Unsupported("the image size overflows".into()))
    }

    fn volume<T: NiftiScalar>(&self, bytes: &[u8]) -> Result<Volume<T>, NiftiError> {
        let end = self.data_end()?;
        if bytes.len() < end {
            return Err(NiftiError::Truncated {
                expected: end - self.vox_offset,
                present: bytes.len().saturating_sub(self.vox_offset),
            });
        }
        let raw = &bytes[self.vox_offset..end];
        let scale = T::IS_FLOAT
            && self.slope != 0.0
            && self.slope.is_finite()
            && self.inter.is_finite()
            && (self.slope != 1.0 || self.inter != 0.0);
        let values: Vec<T> = match self.datatype {
            2 => self.convert::<u8, T>(raw, scale),
            4 => self.convert::<i16, T>(raw, scale),
            512 => self.convert::<u16, T>(raw, scale),
            8 => self.convert::<i32, T>(raw, scale),
            16 => self.convert::<f32, T>(raw, scale),
            _ => self.convert::<f64, T>(raw, scale),
        };
        let grid = Grid {
            dims: self.dims,
            affine: self.affine,
        };
        let data = Array3::from_shape_vec(grid.shape(), values).expect("length checked");
        Ok(Volume { grid, data })
    }

    /// The voxels of `raw` as `T`, converted in parallel blocks. Data already of type
    /// `T` and unscaled is only byte-swapped where needed (a copy, not a conversion).
    fn convert<S: NiftiScalar, T: NiftiScalar>(&self, raw: &[u8], scale: bool) -> Vec<T> {
        let (slope, inter, big) = (self.slope, self.inter, self.big_endian);
        let n = raw.len() / S::SIZE;
        // Zeroed allocations of this size come from fresh pages: the blocks below touch
        // them first, in parallel.
        let mut out = vec![T::default(); n];
        let per_block = BLOCK / S::SIZE;
        let blocks = out
            .par_chunks_mut(per_block)
            .zip(raw[..n * S::SIZE].par_chunks(per_block * S::SIZE));
        let same = S::DATATYPE == T::DATATYPE;
        blocks.for_each(|(out, raw)| {
            let values = out.iter_mut().zip(raw.chunks_exact(S::SIZE));
            match (same && !scale, big) {
                // Written out per byte order so that each loop is a plain (swapping) copy.
                (true, false) => values.for_each(|(v, c)| *v = T::read(c, false)),
                (true, true) => values.for_each(|(v, c)| *v = T::read(c, true)),
                _ if scale => values.for_each(|(v, c)| {
                    *v = T::from_f64(S::read(c, big).to_f64() * slope + inter);
                }),
                _ => values.for_each(|(v, c)| *v = T::from_f64(S::read(c, big).to_f64())),
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An oblique, flipped grid: a rotation about z by 30° and x mirrored.
    fn oblique_grid(dims: [usize; 3]) -> Grid {
        let (s, c) = 30f64.to_radians().sin_cos();
        let sp = [0.8, 0.9, 2.5];
        Grid {
            dims,
            affine: [
                [-c * sp[0], -s * sp[1], 0.0, 120.5],
                [-s * sp[0], c * sp[1], 0.0, -80.25],
                [0.0, 0.0, sp[2], 33.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    fn sample_volume(grid: Grid) -> Volume<f32> {
        let (nz, ny, nx) = grid.shape();
        let data = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
            (i as f32 * 1.5 - j as f32 * 2.25 + k as f32 * 100.0) - 1000.0
        });
        Volume::new(grid, data).unwrap()
    }

    fn assert_affine_close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4], tol: f64) {
        for r in 0..4 {
            for c in 0..4 {
                assert!((a[r][c] - b[r][c]).abs() < tol, "{a:?}\n!=\n{b:?}");
            }
        }
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("radflow-nifti-{}-{name}", std::process::id()))
    }

    #[test]
    fn round_trip_all_types_plain_and_gz() {
        let v = sample_volume(oblique_grid([5, 4, 3]));
        for gz in [false, true] {
            let bytes = if gz {
                write_nifti_gz(&v, "radflow test")
            } else {
                write_nifti(&v, "radflow test")
            };
            assert_eq!(bytes.starts_with(&[0x1f, 0x8b]), gz);
            let back: Volume<f32> = read_nifti(&bytes).unwrap();
            assert_eq!(back.data, v.data);
            assert_affine_close(&back.grid.affine, &v.grid.affine, 1e-5);

            let labels =
                Volume::new(v.grid.clone(), v.data.mapv(|x| (x.abs() as u32 % 4) as u8)).unwrap();
            let bytes = if gz {
                write_nifti_gz(&labels, "")
            } else {
                write_nifti(&labels, "")
            };
            let back: Volume<u8> = read_nifti(&bytes).unwrap();
            assert_eq!(back.data, labels.data);

            let ints = Volume::new(v.grid.clone(), v.data.mapv(|x| x as i16)).unwrap();
            let back: Volume<f32> = read_nifti(&write_nifti(&ints, "")).unwrap();
            assert_eq!(back.data, v.data.mapv(|x| f32::from(x as i16)));
        }
    }

    #[test]
    fn header_fields() {
        let v = sample_volume(oblique_grid([5, 4, 3]));
        let b = write_nifti(
            &v,
            "a description that is certainly longer than eighty bytes, so it must be cut short",
        );
        assert_eq!(b.len(), 352 + 5 * 4 * 3 * 4);
        let i16_at = |o: usize| i16::from_le_bytes([b[o], b[o + 1]]);
        let f32_at = |o: usize| f32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(i32::from_le_bytes(b[0..4].try_into().unwrap()), 348);
        assert_eq!(&b[344..348], b"n+1\0");
        assert_eq!(
            [i16_at(40), i16_at(42), i16_at(44), i16_at(46)],
            [3, 5, 4, 3]
        );
        assert_eq!(i16_at(70), 16);
        assert_eq!(i16_at(72), 32);
        assert_eq!(f32_at(108), 352.0);
        assert_eq!(b[123], 2);
        assert_eq!([i16_at(252), i16_at(254)], [1, 1]);
        // The mirrored x gives a negative determinant, so qfac = -1.
        assert_eq!(f32_at(76), -1.0);
        assert!((f32_at(80) - 0.8).abs() < 1e-6 && (f32_at(88) - 2.5).abs() < 1e-6);
        assert_eq!(b[148 + 79], 0);
        assert_eq!(&b[348..352], &[0, 0, 0, 0]);
    }

    /// Re-reads a written header with the sform disabled, i.e. through the qform.
    fn qform_affine(v: &Volume<f32>) -> [[f64; 4]; 4] {
        let mut b = write_nifti(v, "");
        b[254..256].copy_from_slice(&0i16.to_le_bytes());
        read_nifti::<f32>(&b).unwrap().grid.affine
    }

    #[test]
    fn qform_matches_orthogonal_affines() {
        let mut grids = vec![oblique_grid([2, 2, 2])];
        // Axis permutations and 180° rotations exercise every quaternion pivot.
        for (cols, signs) in [
            ([0, 1, 2], [-1.0, -1.0, 1.0]),
            ([0, 1, 2], [1.0, -1.0, -1.0]),
            ([1, 2, 0], [1.0, 1.0, 1.0]),
            ([2, 0, 1], [-1.0, 1.0, -1.0]),
            ([0, 2, 1], [-1.0, -1.0, -1.0]),
        ] {
            let mut a = [[0.0; 4]; 4];
            for (c, (&r, s)) in cols.iter().zip(signs).enumerate() {
                a[r][c] = s * [0.7, 1.1, 3.0][c];
            }
            a[0][3] = -5.0;
            a[1][3] = 7.0;
            a[2][3] = 9.5;
            a[3][3] = 1.0;
            grids.push(Grid {
                dims: [2, 2, 2],
                affine: a,
            });
        }
        for g in grids {
            let v = sample_volume(g.clone());
            assert_affine_close(&qform_affine(&v), &g.affine, 1e-5);
        }
    }

    #[test]
    fn sheared_affine_keeps_exact_sform_and_rigid_qform() {
        // A 15° gantry tilt: the slice axis is sheared against the image plane.
        let t = 15f64.to_radians();
        let g = Grid {
            dims: [3, 3, 3],
            affine: [
                [-0.7, 0.0, 0.0, 10.0],
                [0.0, -0.7 * t.cos(), 0.0, 20.0],
                [0.0, 0.7 * t.sin(), 1.25, -30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let v = sample_volume(g.clone());
        let back: Volume<f32> = read_nifti(&write_nifti(&v, "")).unwrap();
        assert_affine_close(&back.grid.affine, &g.affine, 1e-6);
        let q = qform_affine(&v);
        // The qform's linear part is a rotation times the spacing: orthogonal columns.
        let col = |c: usize| [q[0][c], q[1][c], q[2][c]];
        let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            assert!(dot(col(a), col(b)).abs() < 1e-5);
        }
        assert_eq!([q[0][3], q[1][3], q[2][3]], [10.0, 20.0, -30.0]);
        // And it stays near the sheared affine (within the tilt).
        let cos = dot(col(2), [0.0, 0.0, 1.0]) / dot(col(2), col(2)).sqrt();
        assert!(cos > t.cos() - 1e-6, "{cos}");
    }

    #[test]
    fn rejects_bad_input_without_allocating() {
        let v = sample_volume(oblique_grid([5, 4, 3]));
        let b = write_nifti(&v, "");
        assert!(matches!(
            read_nifti::<f32>(&b[..b.len() - 1]),
            Err(NiftiError::Truncated { .. })
        ));
        // A header claiming 32767³ float voxels over a few bytes of data.
        let mut huge = b[..400].to_vec();
        for a in 0..3 {
            huge[42 + 2 * a..44 + 2 * a].copy_from_slice(&32767i16.to_le_bytes());
        }
        assert!(matches!(
            read_nifti::<f32>(&huge),
            Err(NiftiError::Truncated { .. })
        ));
        let gz = write_nifti_gz(
            &Volume::new(v.grid.clone(), Array3::<f32>::zeros((3, 4, 5))).unwrap(),
            "",
        );
        let mut head = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut head)
            .unwrap();
        for a in 0..3 {
            head[42 + 2 * a..44 + 2 * a].copy_from_slice(&32767i16.to_le_bytes());
        }
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
        std::io::Write::write_all(&mut enc, &head).unwrap();
        assert!(matches!(
            read_nifti::<f32>(&enc.finish().unwrap()),
            Err(NiftiError::Truncated { .. })
        ));
        assert!(matches!(
            read_nifti::<f32>(b"not a nifti file"),
            Err(NiftiError::NotNifti(_))
        ));
        let mut four_d = b.clone();
        four_d[40..42].copy_from_slice(&4i16.to_le_bytes());
        four_d[48..50].copy_from_slice(&2i16.to_le_bytes());
        assert!(matches!(
            read_nifti::<f32>(&four_d),
            Err(NiftiError::Unsupported(_))
        ));
    }

    #[test]
    fn applies_scaling_to_float_targets() {
        let g = oblique_grid([2, 1, 1]);
        let ints = Volume::new(
            g,
            Array3::from_shape_vec((1, 1, 2), vec![10i16, -4]).unwrap(),
        )
        .unwrap();
        let mut b = write_nifti(&ints, "");
        b[112..116].copy_from_slice(&0.5f32.to_le_bytes());
        b[116..120].copy_from_slice(&3.0f32.to_le_bytes());
        let f: Volume<f32> = read_nifti(&b).unwrap();
        assert_eq!(f.data.as_slice().unwrap(), &[8.0, 1.0]);
        let i: Volume<i16> = read_nifti(&b).unwrap();
        assert_eq!(i.data.as_slice().unwrap(), &[10, -4]);
    }

    #[test]
    fn large_gz_uses_many_blocks_and_stays_valid() {
        // More than one deflate block (BLOCK bytes) to exercise the concatenation.
        let g = oblique_grid([160, 128, 40]);
        let v = sample_volume(g);
        let plain_nii = write_nifti(&v, "big");
        for level in [0, 1, 6] {
            let gz = write_nifti_gz_level(&v, "big", level);
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut plain)
                .unwrap();
            assert_eq!(plain, plain_nii, "level {level}");
            // The block index: FEXTRA, one "RF" subfield, version 1, one entry per block
            // whose lengths tile the deflate data and the image.
            assert_eq!(gz[3], 0x04, "level {level}");
            let xlen = usize::from(u16::from_le_bytes([gz[10], gz[11]]));
            assert_eq!(&gz[12..14], &BLOCK_INDEX_ID);
            let len = usize::from(u16::from_le_bytes([gz[14], gz[15]]));
            assert_eq!(xlen, len + 4);
            assert_eq!(gz[16], 1);
            let entries: Vec<(usize, usize)> = gz[17..12 + xlen]
                .chunks_exact(8)
                .map(|e| {
                    let at = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().unwrap());
                    (at(0) as usize, at(4) as usize)
                })
                .collect();
            assert_eq!(entries.len(), plain_nii.len().div_ceil(BLOCK));
            let deflated: usize = entries.iter().map(|e| e.0).sum();
            assert_eq!(deflated, gz.len() - 12 - xlen - 8);
            assert_eq!(entries.iter().map(|e| e.1).sum::<usize>(), plain_nii.len());
            if level == 0 {
                // Stored blocks: the image plus a few bytes per 64 KiB.
                assert!(gz.len() < plain_nii.len() + plain_nii.len() / 8192 + 1024);
            } else {
                assert!(gz.len() < plain_nii.len(), "level {level} compresses");
            }
            let back: Volume<f32> = read_nifti(&gz).unwrap();
            assert_eq!(back.data, v.data);
        }
        // One block: no index, a plain header.
        let small = write_nifti_gz_level(&sample_volume(oblique_grid([5, 4, 3])), "", 0);
        assert_eq!(small[3], 0);
    }

    #[test]
    fn reads_big_endian_images_written_by_nibabel() {
        let path = temp_path("big-endian.nii");
        let script = r#"
import struct, sys, nibabel as nib, numpy as np
kind = sys.argv[2]
data = (np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2) - 7.25)
h = nib.Nifti1Header(endianness=">")
if kind == "f4":
    h.set_data_dtype(">f4")
    img = nib.Nifti1Image(data.astype(">f4"), np.eye(4), header=h)
else:
    h.set_data_dtype(">i2")
    img = nib.Nifti1Image(np.round(data * 4).astype(">i2"), np.eye(4), header=h)
nib.save(img, sys.argv[1])
if kind == "i2":
    # scl_slope and scl_inter, which nibabel sets itself when saving.
    with open(sys.argv[1], "r+b") as f:
        f.seek(112)
        f.write(struct.pack(">ff", 0.25, 10.0))
"#;
        for kind in ["f4", "i2"] {
            radflow_shared::testing::run_python(script, &[path.to_str().unwrap(), kind]);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..4], &348i32.to_be_bytes(), "a big-endian header");
            let v: Volume<f32> = read_nifti(&bytes).unwrap();
            assert_eq!(v.grid.dims, [4, 3, 2]);
            for ((k, j, i), &x) in v.data.indexed_iter() {
                let base = (i * 6 + j * 2 + k) as f32 - 7.25;
                let expected = if kind == "f4" {
                    base
                } else {
                    (base * 4.0).round() * 0.25 + 10.0
                };
                assert_eq!(x, expected, "{kind} at {i} {j} {k}");
            }
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn nifti_crate_reads_our_files() {
        use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
        let v = sample_volume(oblique_grid([6, 5, 4]));
        let path = temp_path("crate.nii.gz");
        std::fs::write(&path, write_nifti_gz(&v, "radflow")).unwrap();
        let obj = ReaderOptions::new().read_file(&path).unwrap();
        std::fs::remove_file(&path).ok();
        let h = obj.header();
        assert_eq!(&h.dim[..4], &[3, 6, 5, 4]);
        assert_eq!(h.sform_code, 1);
        for (row, want) in [h.srow_x, h.srow_y, h.srow_z].iter().zip(&v.grid.affine) {
            for (got, want) in row.iter().zip(want) {
                assert!((f64::from(*got) - want).abs() < 1e-5);
            }
        }
        let arr = obj.into_volume().into_ndarray::<f32>().unwrap();
        assert_eq!(arr.shape(), &[6, 5, 4]);
        for (k, j, i) in [(0, 0, 0), (3, 4, 5), (1, 2, 3)] {
            assert_eq!(arr[[i, j, k].as_slice()], v.data[[k, j, i]]);
        }
    }

    #[test]
    fn nibabel_agrees_on_affine_qform_and_data() {
        let v = sample_volume(oblique_grid([7, 6, 5]));
        let path = temp_path("nibabel.nii.gz");
        std::fs::write(&path, write_nifti_gz(&v, "radflow")).unwrap();
        // Stored blocks with the block index in the gzip header read the same.
        let large = sample_volume(oblique_grid([160, 128, 40]));
        let indexed = temp_path("nibabel-indexed.nii.gz");
        std::fs::write(&indexed, write_nifti_gz_level(&large, "radflow", 0)).unwrap();
        let script = r#"
import sys, json, nibabel as nib, numpy as np
img = nib.load(sys.argv[1])
q = img.get_qform()
big = nib.load(sys.argv[2])
print(json.dumps({"affine": img.affine.tolist(), "qform": q.tolist(),
  "sum": float(np.asarray(img.dataobj, dtype=np.float64).sum()),
  "shape": list(img.shape), "v": float(img.get_fdata()[5, 4, 3]),
  "big_shape": list(big.shape), "big_v": float(big.get_fdata()[150, 100, 30]),
  "big_sum": float(np.asarray(big.dataobj, dtype=np.float64).sum())}))
"#;
        let out = radflow_shared::testing::run_python(
            script,
            &[path.to_str().unwrap(), indexed.to_str().unwrap()],
        );
        std::fs::remove_file(&path).ok();
        std::fs::remove_file(&indexed).ok();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let mat = |key: &str| -> [[f64; 4]; 4] {
            std::array::from_fn(|r| std::array::from_fn(|c| j[key][r][c].as_f64().unwrap()))
        };
        assert_affine_close(&mat("affine"), &v.grid.affine, 1e-4);
        assert_affine_close(&mat("qform"), &v.grid.affine, 1e-4);
        let sum: f64 = v.data.iter().map(|x| f64::from(*x)).sum();
        assert!((j["sum"].as_f64().unwrap() - sum).abs() < 1e-3 * sum.abs().max(1.0));
        assert_eq!(j["shape"], serde_json::json!([7, 6, 5]));
        assert_eq!(j["v"].as_f64().unwrap(), f64::from(v.data[[3, 4, 5]]));
        assert_eq!(j["big_shape"], serde_json::json!([160, 128, 40]));
        assert_eq!(
            j["big_v"].as_f64().unwrap(),
            f64::from(large.data[[30, 100, 150]])
        );
        let big_sum: f64 = large.data.iter().map(|x| f64::from(*x)).sum();
        assert!((j["big_sum"].as_f64().unwrap() - big_sum).abs() < 1e-6 * big_sum.abs().max(1.0));
    }
}
