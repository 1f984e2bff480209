//! Sample conversion: stored samples of any bit layout to physical `f32` values in one
//! pass (bits masked and sign-extended, modality LUT, `MONOCHROME1` mirrored, padding
//! masked; see [`crate::decode`]), and the tiles of a mosaic gathered on the way.

use crate::header::{Endian, InstanceHeader, SampleFormat};

/// Converts the images of one decoded frame into their buffers.
pub(super) fn write_images(
    header: &InstanceHeader,
    format: &SampleFormat,
    raw: &[u8],
    endian: Endian,
    outs: Vec<(usize, &mut [f32])>,
) {
    let bps = format.bytes_per_sample();
    for (index, out) in outs {
        let h = &header.images[index];
        match h.tile {
            None => convert(raw, endian, format, h.rescale, out),
            Some(t) => {
                // Gather the tile's rows, then convert them as one image.
                let (tr, tc) = (h.rows, h.cols);
                let (gr, gc) = ((t.index / t.grid) as usize, (t.index % t.grid) as usize);
                let stride = header.plan.frame_cols * bps;
                let mut tile = Vec::with_capacity(tr * tc * bps);
                for r in 0..tr {
                    let start = (gr * tr + r) * stride + gc * tc * bps;
                    tile.extend_from_slice(&raw[start..start + tc * bps]);
                }
                convert(&tile, endian, format, h.rescale, out);
            }
        }
    }
}

/// Converts `out.len()` raw samples to physical `f32` values in one pass.
fn convert(raw: &[u8], endian: Endian, f: &SampleFormat, rescale: (f64, f64), out: &mut [f32]) {
    let (slope, intercept) = rescale;
    // MONOCHROME1 is mirrored inside the physical range of the stored values, which folds
    // into the linear modality LUT: v' = (lo + hi) - (slope * s + intercept).
    let (smin, smax) = f.stored_range();
    let (pmin, pmax) = {
        let a = slope * smin as f64 + intercept;
        let b = slope * smax as f64 + intercept;
        (a.min(b), a.max(b))
    };
    let (slope, intercept) = if f.monochrome1 {
        (-slope, pmin + pmax - intercept)
    } else {
        (slope, intercept)
    };
    let (slope32, intercept32) = (slope as f32, intercept as f32);
    let raw = &raw[..out.len() * f.bytes_per_sample()];
    match f.padding {
        None => fill(out, raw, endian, f, |s: i64| {
            s as f32 * slope32 + intercept32
        }),
        Some((lo, hi)) => {
            fill(out, raw, endian, f, |s: i64| {
                if (lo..=hi).contains(&s) {
                    f32::NAN
                } else {
                    s as f32 * slope32 + intercept32
                }
            });
            let fill = f.pad_to.unwrap_or_else(|| {
                let min = out
                    .iter()
                    .copied()
                    .filter(|v| !v.is_nan())
                    .fold(f32::INFINITY, f32::min);
                if min.is_finite() { min } else { pmin as f32 }
            });
            for v in out.iter_mut().filter(|v| v.is_nan()) {
                *v = fill;
            }
        }
    }
}

fn fill(out: &mut [f32], raw: &[u8], endian: Endian, f: &SampleFormat, map: impl Fn(i64) -> f32) {
    // The sign extension is done in i32 for 8/16-bit samples (the common, hot path).
    let up = 32 - u32::from(f.bits_stored);
    let shift = u32::from(f.shift);
    let signed = f.signed;
    let small = |raw: u32| -> i64 {
        let v = (raw >> shift) << up;
        if signed {
            i64::from((v as i32) >> up)
        } else {
            i64::from(v >> up)
        }
    };
    let put = |out: &mut [f32], values: &mut dyn Iterator<Item = f32>| {
        for (o, v) in out.iter_mut().zip(values) {
            *o = v;
        }
    };
    match (f.bits_allocated, endian) {
        (8, _) => put(out, &mut raw.iter().map(|&b| map(small(u32::from(b))))),
        (16, Endian::Little) => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = map(small(u32::from(u16::from_le_bytes([c[0], c[1]]))));
            }
        }
        (16, Endian::Big) => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = map(small(u32::from(u16::from_be_bytes([c[0], c[1]]))));
            }
        }
        (_, Endian::Little) => put(
            out,
            &mut raw
                .chunks_exact(4)
                .map(|c| map(f.stored(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        ),
        (_, Endian::Big) => put(
            out,
            &mut raw
                .chunks_exact(4)
                .map(|c| map(f.stored(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))),
        ),
    }
}
