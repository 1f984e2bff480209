//! A decoder for sequential DCT-based JPEG with Huffman coding (ITU T.81 processes 1,
//! 2 and 4: `SOF0`, `SOF1`) of grey-scale images, 8 or 12 bits per sample.
//!
//! DICOM's JPEG Extended syntax (.51) carries 12-bit lossy CT and MR from archives
//! that compressed their priors; the `jpeg-decoder` crate behind dicom-pixeldata
//! decodes only 8-bit DCT streams, so these images would otherwise be refused. The
//! decoder handles what DICOM grey-scale images use: one component, any sampling
//! factors (one component makes each block its own MCU), 8- or 16-bit quantisation
//! tables, restart intervals. The inverse DCT is computed in `f32` from the T.81
//! definition (A.3.3) and rounded; T.81 leaves the arithmetic of the inverse DCT to
//! the decoder, so samples may differ by one from integer implementations such as
//! IJG's (which DCMTK uses), as they do between any two decoders.
//!
//! Anything else (several components, progressive or arithmetic coding, lossless or
//! hierarchical frames, a height given by a DNL marker) returns
//! [`JpegError::Unsupported`]; damaged data returns [`JpegError::Corrupt`],
//! never a panic, and allocates no more than the output the caller asked for.

use std::sync::OnceLock;

use crate::jpeg_stream::{
    Bits, Huffman, JpegError, difference, huffman_tables, same_size, u16_at, walk_segments,
};
use JpegError::{Corrupt, Unsupported};

/// Position in the 8×8 block (row-major) of the `k`-th coefficient in zig-zag order.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Frame and scan parameters.
struct Header {
    precision: u32,
    rows: usize,
    cols: usize,
    /// Quantisation values in zig-zag order.
    quant: [u16; 64],
    dc: Huffman,
    ac: Huffman,
    restart_interval: usize,
    /// Offset of the entropy-coded data.
    data_start: usize,
}

fn parse(b: &[u8]) -> Result<Header, JpegError> {
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    // Precision, rows, columns, component id, quantisation table.
    let mut frame: Option<(u32, usize, usize, u8, usize)> = None;
    let mut restart_interval = 0usize;
    walk_segments(b, |marker, seg, end| {
        match marker {
            0xC0 | 0xC1 => {
                if seg.len() < 6 {
                    return Err(Corrupt("short frame header".into()));
                }
                let precision = u32::from(seg[0]);
                let rows = usize::from(u16::from_be_bytes([seg[1], seg[2]]));
                let cols = usize::from(u16::from_be_bytes([seg[3], seg[4]]));
                if seg[5] != 1 {
                    return Err(Unsupported(format!("{} components", seg[5])));
                }
                if seg.len() < 9 {
                    return Err(Corrupt("short frame header".into()));
                }
                if precision != 8 && precision != 12 {
                    return Err(Corrupt(format!("sample precision {precision}")));
                }
                if rows == 0 {
                    return Err(Unsupported("a height given by a DNL marker".into()));
                }
                let table = usize::from(seg[8]);
                if table > 3 {
                    return Err(Corrupt(format!("quantisation table {table}")));
                }
                frame = Some((precision, rows, cols, seg[6], table));
            }
            0xC2..=0xCF if marker != 0xC4 && marker != 0xC8 && marker != 0xCC => {
                return Err(Unsupported(format!("frame type SOF{}", marker - 0xC0)));
            }
            0xDB => {
                let mut q = 0;
                while q < seg.len() {
                    let (wide, id) = (seg[q] >> 4, usize::from(seg[q] & 0x0F));
                    if wide > 1 || id > 3 {
                        return Err(Corrupt("a bad quantisation table header".into()));
                    }
                    let size = if wide == 1 { 128 } else { 64 };
                    let values = seg
                        .get(q + 1..q + 1 + size)
                        .ok_or_else(|| Corrupt("short quantisation table".into()))?;
                    let mut table = [0u16; 64];
                    for (k, v) in table.iter_mut().enumerate() {
                        *v = if wide == 1 {
                            u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
                        } else {
                            u16::from(values[k])
                        };
                    }
                    quant[id] = Some(table);
                    q += 1 + size;
                }
            }
            0xC4 => huffman_tables(seg, |class, id, counts, symbols| {
                let table = Some(Huffman::of_bytes(counts, symbols)?);
                if class == 0 {
                    dc[id] = table;
                } else {
                    ac[id] = table;
                }
                Ok(())
            })?,
            0xDD => {
                restart_interval = u16_at(seg, 0)?;
            }
            0xDA => {
                let (precision, rows, cols, component, qt) =
                    frame.ok_or_else(|| Corrupt("a scan before the frame header".into()))?;
                if seg.first() != Some(&1) || seg.len() < 6 {
                    return Err(Unsupported("a scan of several components".into()));
                }
                if seg[1] != component {
                    return Err(Corrupt("the scan names another component".into()));
                }
                // Spectral selection and successive approximation (seg[3..6]) mean
                // nothing to a sequential scan, which T.81 fixes at 0, 63 and 0; some
                // encoders wrote other values (pydicom's JPEG-lossy.dcm has Se = 0),
                // and decoders such as libjpeg ignore them, as here.
                let (d, a) = (usize::from(seg[2] >> 4), usize::from(seg[2] & 0x0F));
                let table = |set: &[Option<Huffman>; 4], id: usize, what: &str| {
                    set.get(id)
                        .cloned()
                        .flatten()
                        .ok_or_else(|| Corrupt(format!("{what} Huffman table {id} is not defined")))
                };
                return Ok(Some(Header {
                    precision,
                    rows,
                    cols,
                    quant: quant[qt].ok_or_else(|| {
                        Corrupt(format!("quantisation table {qt} is not defined"))
                    })?,
                    dc: table(&dc, d, "DC")?,
                    ac: table(&ac, a, "AC")?,
                    restart_interval,
                    data_start: end,
                }));
            }
            _ => {}
        }
        Ok(None)
    })
}

/// `COS[x][u]` = C(u)/2 · cos((2x+1)uπ/16), the 1-D inverse DCT basis (T.81 A.3.3).
fn cosines() -> &'static [[f32; 8]; 8] {
    static TABLE: OnceLock<[[f32; 8]; 8]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0f32; 8]; 8];
        for (x, row) in t.iter_mut().enumerate() {
            for (u, c) in row.iter_mut().enumerate() {
                let cu = if u == 0 {
                    std::f64::consts::FRAC_1_SQRT_2
                } else {
                    1.0
                };
                let angle = ((2 * x + 1) * u) as f64 * std::f64::consts::PI / 16.0;
                *c = (cu / 2.0 * angle.cos()) as f32;
            }
        }
        t
    })
}

/// The samples of one block from its dequantised coefficients (row-major), level
/// shifted and clamped to the sample range.
fn inverse_dct(coef: &[f32; 64], precision: u32, out: &mut [i32; 64]) {
    let cos = cosines();
    let shift = (1i32 << (precision - 1)) as f32;
    let max = (1i32 << precision) - 1;
    // Rows first (over u), then columns (over v). A row of zero coefficients adds
    // nothing, and in a compressed image most rows are zero: only the others are
    // transformed and summed (adding 0.0 does not change a sum, so the result is the
    // same as the full computation's).
    let mut tmp = [[0f32; 8]; 8];
    let mut nonzero = [0usize; 8];
    let mut n = 0;
    for v in 0..8 {
        let row = &coef[v * 8..v * 8 + 8];
        if row.iter().all(|c| *c == 0.0) {
            continue;
        }
        for (x, t) in tmp[v].iter_mut().enumerate() {
            *t = row.iter().zip(&cos[x]).map(|(a, b)| a * b).sum();
        }
        nonzero[n] = v;
        n += 1;
    }
    for (y, c) in cos.iter().enumerate() {
        for x in 0..8 {
            let s: f32 = nonzero[..n].iter().map(|&v| tmp[v][x] * c[v]).sum();
            out[y * 8 + x] = ((s + shift).round() as i32).clamp(0, max);
        }
    }
}

/// Decodes one codestream into `out` as little-endian samples of `bytes_per_sample`
/// (1 or 2) bytes, for an image of `rows` × `cols`; `out` is cleared first.
pub fn decode(
    stream: &[u8],
    rows: usize,
    cols: usize,
    bytes_per_sample: usize,
    out: &mut Vec<u8>,
) -> Result<(), JpegError> {
    let h = parse(stream)?;
    same_size((h.rows, h.cols), (rows, cols))?;
    if !(1..=2).contains(&bytes_per_sample) || (bytes_per_sample == 1 && h.precision > 8) {
        return Err(Unsupported(format!(
            "{}-bit samples into {bytes_per_sample}-byte samples",
            h.precision
        )));
    }
    let (block_rows, block_cols) = (rows.div_ceil(8), cols.div_ceil(8));
    // Every block takes at least two bits (an end-of-block code and a DC category):
    // a stream cannot make more blocks than four per byte, whatever its header claims.
    if block_rows * block_cols > 4 * stream.len() {
        return Err(Corrupt(format!(
            "{} bytes cannot hold {cols}x{rows} samples",
            stream.len()
        )));
    }
    out.clear();
    out.resize(rows * cols * bytes_per_sample, 0);
    let mut bits = Bits::new(stream, h.data_start);
    let quant: [f32; 64] = h.quant.map(f32::from);
    let mut coef = [0f32; 64];
    let mut samples = [0i32; 64];
    let mut dc_pred = 0i32;
    let mut next_restart = 0u8;
    for block in 0..block_rows * block_cols {
        if h.restart_interval > 0 && block > 0 && block % h.restart_interval == 0 {
            let m = bits.restart()?;
            if m != next_restart {
                return Err(Corrupt(format!("restart marker {m} out of order")));
            }
            next_restart = (next_restart + 1) % 8;
            dc_pred = 0;
        }
        coef.fill(0.0);
        // DC: a category and its extra bits, the difference from the last block's.
        if bits_low(&bits) {
            bits.refill();
        }
        let t = u32::from(bits.decode(&h.dc)?);
        if t > 15 {
            return Err(Corrupt(format!("DC category {t}")));
        }
        let diff = if t == 0 {
            0
        } else {
            difference(t, bits.take(t))
        };
        dc_pred = dc_pred.wrapping_add(diff);
        coef[0] = dc_pred as f32 * quant[0];
        // AC: (run of zeros, category) pairs in zig-zag order.
        let mut k = 1;
        while k < 64 {
            if bits_low(&bits) {
                bits.refill();
            }
            let rs = bits.decode(&h.ac)?;
            let (run, size) = (usize::from(rs >> 4), u32::from(rs & 0x0F));
            if size == 0 {
                if run == 15 {
                    k += 16;
                    continue;
                }
                break;
            }
            k += run;
            if k > 63 {
                return Err(Corrupt("AC coefficients past the end of a block".into()));
            }
            coef[ZIGZAG[k]] = difference(size, bits.take(size)) as f32 * quant[k];
            k += 1;
        }
        if k > 64 {
            return Err(Corrupt("a zero run past the end of a block".into()));
        }
        inverse_dct(&coef, h.precision, &mut samples);
        let (br, bc) = (block / block_cols, block % block_cols);
        for y in 0..8 {
            let r = br * 8 + y;
            if r >= rows {
                break;
            }
            for x in 0..8 {
                let c = bc * 8 + x;
                if c >= cols {
                    break;
                }
                let v = samples[y * 8 + x];
                let at = (r * cols + c) * bytes_per_sample;
                if bytes_per_sample == 1 {
                    out[at] = v as u8;
                } else {
                    out[at..at + 2].copy_from_slice(&(v as u16).to_le_bytes());
                }
            }
        }
    }
    bits.check_complete()
}

/// Whether the bit buffer may not hold a whole code (16 bits) and its extra bits (15).
#[inline(always)]
fn bits_low(bits: &Bits<'_>) -> bool {
    bits.available() < 32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes entropy-coded bits with byte stuffing.
    struct Writer {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }

    impl Writer {
        fn put(&mut self, value: u32, len: u32) {
            for i in (0..len).rev() {
                self.acc = (self.acc << 1) | ((value >> i) & 1);
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    if self.acc == 0xFF {
                        self.out.push(0);
                    }
                    self.acc = 0;
                    self.n = 0;
                }
            }
        }

        /// Pads the last byte with one bits.
        fn flush(&mut self) {
            while self.n != 0 {
                self.put(1, 1);
            }
        }
    }

    /// Category and extra bits of a coefficient or difference (T.81 F.1.2.1).
    fn category(v: i32) -> (u32, u32) {
        let s = 32 - v.unsigned_abs().leading_zeros();
        let bits = if v < 0 { v + (1 << s) - 1 } else { v } as u32;
        (s, bits & ((1u32 << s) - 1))
    }

    /// AC symbols in code order: EOB, ZRL, then every (run, size).
    fn ac_symbols() -> Vec<u8> {
        let mut s = vec![0x00, 0xF0];
        for run in 0..16u8 {
            for size in 1..16u8 {
                s.push((run << 4) | size);
            }
        }
        s
    }

    /// A 12-bit grey-scale image as sequential DCT JPEG (SOF1): quantisation step `q`
    /// for every coefficient (a 16-bit table), DC codes of 4 bits, AC codes of 8 bits,
    /// and a restart marker every `restart` blocks (0: none).
    fn encode(img: &[u16], rows: usize, cols: usize, q: u16, restart: usize) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        // DQT, 16-bit table 0.
        out.extend([0xFF, 0xDB, 0, 131, 0x10]);
        for _ in 0..64 {
            out.extend(q.to_be_bytes());
        }
        // SOF1: 12 bits, rows, columns, one component (id 1, 1x1, table 0).
        out.extend([0xFF, 0xC1, 0, 11, 12]);
        out.extend((rows as u16).to_be_bytes());
        out.extend((cols as u16).to_be_bytes());
        out.extend([1, 1, 0x11, 0]);
        // DHT: DC table 0 (categories 0-15, 4-bit codes), AC table 0 (8-bit codes).
        let ac = ac_symbols();
        let len = 2 + 17 + 16 + 17 + ac.len();
        out.extend([0xFF, 0xC4, (len >> 8) as u8, len as u8, 0x00]);
        let mut counts = [0u8; 16];
        counts[3] = 16;
        out.extend(counts);
        out.extend(0..16u8);
        out.push(0x10);
        let mut counts = [0u8; 16];
        counts[7] = ac.len() as u8;
        out.extend(counts);
        out.extend(&ac);
        if restart > 0 {
            out.extend([0xFF, 0xDD, 0, 4]);
            out.extend((restart as u16).to_be_bytes());
        }
        out.extend([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 0, 63, 0]);
        let ac_code = |sym: u8| ac.iter().position(|s| *s == sym).unwrap() as u32;
        let cos = cosines();
        let mut w = Writer {
            out: Vec::new(),
            acc: 0,
            n: 0,
        };
        let (brows, bcols) = (rows.div_ceil(8), cols.div_ceil(8));
        let mut pred = 0i32;
        let mut marker = 0u8;
        for block in 0..brows * bcols {
            if restart > 0 && block > 0 && block % restart == 0 {
                w.flush();
                w.out.extend([0xFF, 0xD0 + marker]);
                marker = (marker + 1) % 8;
                pred = 0;
            }
            let (br, bc) = (block / bcols, block % bcols);
            // Edge blocks repeat the last row and column.
            let sample = |y: usize, x: usize| {
                let (r, c) = ((br * 8 + y).min(rows - 1), (bc * 8 + x).min(cols - 1));
                f32::from(img[r * cols + c]) - 2048.0
            };
            let mut zz = [0i32; 64];
            for (k, pos) in ZIGZAG.iter().enumerate() {
                let (v, u) = (pos / 8, pos % 8);
                let mut f = 0f32;
                for y in 0..8 {
                    for x in 0..8 {
                        f += sample(y, x) * cos[x][u] * cos[y][v];
                    }
                }
                zz[k] = (f / f32::from(q)).round() as i32;
            }
            let (s, bits) = category(zz[0] - pred);
            pred = zz[0];
            w.put(s, 4);
            w.put(bits, s);
            let mut run = 0;
            for &c in &zz[1..] {
                if c == 0 {
                    run += 1;
                    continue;
                }
                while run >= 16 {
                    w.put(ac_code(0xF0), 8);
                    run -= 16;
                }
                let (s, bits) = category(c);
                w.put(ac_code(((run as u8) << 4) | s as u8), 8);
                w.put(bits, s);
                run = 0;
            }
            if run > 0 {
                w.put(ac_code(0x00), 8);
            }
        }
        w.flush();
        out.extend(w.out);
        out.extend([0xFF, 0xD9]);
        out
    }

    /// A 12-bit test image: a ramp, an edge and deterministic noise over the range.
    fn image(rows: usize, cols: usize) -> Vec<u16> {
        let mut state = 0x9E37_79B9u32;
        (0..rows * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let (r, c) = (i / cols, i % cols);
                let base = if c > cols / 2 {
                    3000
                } else {
                    200 + 40 * r as u32
                };
                ((base + state % 200) as u16).min(4095)
            })
            .collect()
    }

    fn decoded(stream: &[u8], rows: usize, cols: usize) -> Result<Vec<u16>, JpegError> {
        let mut out = Vec::new();
        decode(stream, rows, cols, 2, &mut out)?;
        Ok(out
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect())
    }

    /// The encoder here shares the decoder's DCT basis, so this checks the coding
    /// (Huffman, zig-zag, quantisation, edges), not the basis itself: streams of real
    /// encoders are compared with DCMTK's and libjpeg's decoding in
    /// `tests/references.rs`.
    #[test]
    fn round_trips_within_the_quantisation_error() {
        // Sizes that are and are not multiples of the block size.
        for (rows, cols) in [(16, 16), (13, 21), (1, 9)] {
            let img = image(rows, cols);
            let got = decoded(&encode(&img, rows, cols, 1, 0), rows, cols).unwrap();
            let worst = img
                .iter()
                .zip(&got)
                .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                .max()
                .unwrap();
            assert!(worst <= 1, "{rows}x{cols}: off by {worst}");
            // Coarser quantisation: still the image, only less exact.
            let got = decoded(&encode(&img, rows, cols, 16, 0), rows, cols).unwrap();
            let mean = img
                .iter()
                .zip(&got)
                .map(|(a, b)| f64::from((i32::from(*a) - i32::from(*b)).abs()))
                .sum::<f64>()
                / img.len() as f64;
            assert!(mean < 40.0, "{rows}x{cols}: mean error {mean}");
        }
    }

    #[test]
    fn restart_intervals_decode_like_one_interval() {
        let (rows, cols) = (24, 40);
        let img = image(rows, cols);
        let plain = decoded(&encode(&img, rows, cols, 2, 0), rows, cols).unwrap();
        for restart in [1, 3, 7] {
            let stream = encode(&img, rows, cols, 2, restart);
            assert_eq!(
                decoded(&stream, rows, cols).unwrap(),
                plain,
                "every {restart}"
            );
        }
    }

    #[test]
    fn refuses_what_it_does_not_handle_and_survives_damage() {
        let (rows, cols) = (16, 24);
        let stream = encode(&image(rows, cols), rows, cols, 4, 2);
        // Another image size than the DICOM header's.
        assert!(matches!(
            decoded(&stream, 16, 16),
            Err(JpegError::Corrupt(_))
        ));
        // Progressive and lossless frames, and three components.
        let sof = stream.windows(2).position(|w| w == [0xFF, 0xC1]).unwrap();
        for marker in [0xC2, 0xC3, 0xC9] {
            let mut s = stream.clone();
            s[sof + 1] = marker;
            assert!(matches!(
                decoded(&s, rows, cols),
                Err(JpegError::Unsupported(_))
            ));
        }
        let mut s = stream.clone();
        s[sof + 9] = 3;
        assert!(matches!(
            decoded(&s, rows, cols),
            Err(JpegError::Unsupported(_))
        ));
        // 12-bit samples do not fit one byte.
        assert!(decode(&stream, rows, cols, 1, &mut Vec::new()).is_err());
        // A stream cut anywhere is an error, never made-up samples or a panic.
        let eoi = stream.len() - 2;
        for len in 0..eoi {
            assert!(decoded(&stream[..len], rows, cols).is_err(), "cut at {len}");
        }
        // Flipped bytes: any outcome but a panic.
        let mut state = 0x2545_F491u32;
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let mut s = stream.clone();
            let at = state as usize % s.len();
            s[at] ^= (state >> 24) as u8 | 1;
            let _ = decoded(&s, rows, cols);
        }
    }
}
