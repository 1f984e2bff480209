//! Siemens MOSAIC images: several slices tiled into one 2D image.
//!
//! Siemens MR scanners store an EPI volume (fMRI, diffusion) as one image whose pixel
//! matrix is a square grid of slices (`ImageType` contains `MOSAIC`). Fed to a model as
//! it is, such an image would be one absurd slice; radflow cuts it back into its slices
//! or refuses the series. What that takes:
//! - the number of slices, from the private element *NumberOfImagesInMosaic*
//!   (0019,xx0A of the `SIEMENS MR HEADER` block) or the CSA image header (0029,xx10 of
//!   the `SIEMENS CSA HEADER` block); the grid is `ceil(sqrt(n))` tiles on a side;
//! - the position of the first slice: Image Position (Patient) of a mosaic is that of
//!   the whole tiled image as if it were centred like one slice, so it is moved by half
//!   the size difference between the mosaic and a tile, along rows and columns;
//! - the direction in which the slices follow each other: the cross product of the
//!   column and row directions, flipped when the CSA header's *SliceNormalVector* points
//!   the other way; the step is Spacing Between Slices, else Slice Thickness.
//!
//! These are the conventions nibabel's `MosaicWrapper` follows; the tests compare with it.
//! The CSA header is a Siemens binary format; [`parse_csa`] reads its second version
//! ("SV10") with every length checked against the bytes present.

use std::collections::HashMap;

/// Largest number of entries (tags, or items of one tag) accepted in a CSA header.
const MAX_CSA_ENTRIES: u32 = 1000;

/// Most slices accepted in one mosaic (scanners tile a few dozen to a few hundred).
const MAX_MOSAIC_IMAGES: usize = 4096;

/// How one mosaic image is cut into slices.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MosaicLayout {
    /// Slices in the mosaic.
    pub images: usize,
    /// Tiles per side of the grid.
    pub grid: usize,
    /// Rows and columns of one tile.
    pub tile_rows: usize,
    pub tile_cols: usize,
    /// Image Position (Patient) of each slice, in order (LPS mm).
    pub positions: Vec<[f64; 3]>,
}

/// What the layout needs from the header of a mosaic image.
pub(crate) struct MosaicInput<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Image Position (Patient) of the mosaic as stored.
    pub position: [f64; 3],
    /// Image Orientation (Patient).
    pub orientation: [f64; 6],
    /// Pixel Spacing, `[row spacing, column spacing]`.
    pub pixel_spacing: [f64; 2],
    /// Spacing Between Slices, else Slice Thickness, else 1 mm.
    pub slice_step: f64,
    /// Number of images, from the Siemens MR header block if present.
    pub images: Option<usize>,
    /// The CSA image header's fields, if it could be read.
    pub csa: Option<&'a HashMap<String, Vec<String>>>,
}

/// Works out the slices of a mosaic; the error says what is missing or inconsistent.
pub(crate) fn layout(m: &MosaicInput<'_>) -> Result<MosaicLayout, String> {
    let from_csa = m
        .csa
        .and_then(|c| c.get("NumberOfImagesInMosaic"))
        .and_then(|v| v.first())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 1.0)
        .map(|n| n as usize);
    let images = m.images.filter(|n| *n > 0).or(from_csa).ok_or_else(|| {
        "the number of images in the mosaic is not recorded (no NumberOfImagesInMosaic)".to_owned()
    })?;
    if images > MAX_MOSAIC_IMAGES {
        return Err(format!(
            "{images} images in one mosaic are more than the limit of {MAX_MOSAIC_IMAGES}"
        ));
    }
    let grid = (images as f64).sqrt().ceil() as usize;
    if grid == 0 || !m.rows.is_multiple_of(grid) || !m.cols.is_multiple_of(grid) {
        return Err(format!(
            "a {}x{} mosaic cannot hold {images} images on a {grid}x{grid} grid",
            m.cols, m.rows
        ));
    }
    let (tile_rows, tile_cols) = (m.rows / grid, m.cols / grid);
    let o = m.orientation;
    let row_dir = [o[0], o[1], o[2]];
    let col_dir = [o[3], o[4], o[5]];
    let [row_spacing, col_spacing] = m.pixel_spacing;
    // Half the size difference between the mosaic and one tile, in rows and columns.
    let dr = (m.rows - tile_rows) as f64 / 2.0;
    let dc = (m.cols - tile_cols) as f64 / 2.0;
    let first: [f64; 3] = std::array::from_fn(|a| {
        m.position[a] + col_dir[a] * row_spacing * dr + row_dir[a] * col_spacing * dc
    });
    let mut normal = cross(col_dir, row_dir);
    if let Some(csa) = m
        .csa
        .and_then(|c| c.get("SliceNormalVector"))
        .and_then(|v| parse_vector(v))
        && dot(csa, normal) < 0.0
    {
        normal = normal.map(|x| -x);
    }
    let positions = (0..images)
        .map(|k| std::array::from_fn(|a| first[a] + k as f64 * m.slice_step * normal[a]))
        .collect();
    Ok(MosaicLayout {
        images,
        grid,
        tile_rows,
        tile_cols,
        positions,
    })
}

fn parse_vector(v: &[String]) -> Option<[f64; 3]> {
    let x: Vec<f64> = v
        .iter()
        .filter_map(|s| s.trim().parse::<f64>().ok())
        .collect();
    (x.len() >= 3 && x.iter().all(|v| v.is_finite())).then(|| [x[0], x[1], x[2]])
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Reads a CSA2 ("SV10") header into name → non-empty text values.
///
/// Layout: `SV10`, 4 bytes, the tag count and a check word (u32 each); then per tag a
/// 64-byte NUL-terminated name, VM (i32), VR (4 bytes), SyngoDT (i32), item count
/// (i32) and a check word (i32); then per item four i32 of which the second is the
/// value length, and the value, padded to a multiple of 4 bytes.
pub(crate) fn parse_csa(b: &[u8]) -> Result<HashMap<String, Vec<String>>, String> {
    if !b.starts_with(b"SV10") {
        return Err("the CSA header is not in the SV10 format".into());
    }
    let mut r = Reader { b, pos: 8 };
    let tags = r.u32()?;
    r.u32()?;
    if tags == 0 || tags > MAX_CSA_ENTRIES {
        return Err(format!("the CSA header claims {tags} tags"));
    }
    let mut out = HashMap::new();
    for _ in 0..tags {
        let name = r.bytes(64)?;
        let name = text(name);
        let _vm = r.u32()?;
        r.bytes(4)?;
        let _syngo_dt = r.u32()?;
        let items = r.u32()?;
        r.u32()?;
        if items > MAX_CSA_ENTRIES {
            return Err(format!("CSA tag {name} claims {items} items"));
        }
        let mut values = Vec::new();
        for _ in 0..items {
            r.u32()?;
            let len = r.u32()? as usize;
            r.u32()?;
            r.u32()?;
            let value = text(r.bytes(len)?);
            r.bytes((4 - len % 4) % 4).or_else(|_| r.rest())?;
            if !value.is_empty() {
                values.push(value);
            }
        }
        out.insert(name, values);
    }
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| format!("the CSA header ends early at byte {}", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Whatever is left (the padding of the last value may be cut off).
    fn rest(&mut self) -> Result<&'a [u8], String> {
        let s = &self.b[self.pos..];
        self.pos = self.b.len();
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let s = self.bytes(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CSA2 header with the given tags.
    fn csa(tags: &[(&str, &[&str])]) -> Vec<u8> {
        let mut b = b"SV10\x04\x03\x02\x01".to_vec();
        b.extend_from_slice(&(tags.len() as u32).to_le_bytes());
        b.extend_from_slice(&77u32.to_le_bytes());
        for (name, values) in tags {
            let mut n = [0u8; 64];
            n[..name.len()].copy_from_slice(name.as_bytes());
            b.extend_from_slice(&n);
            b.extend_from_slice(&(values.len() as u32).to_le_bytes());
            b.extend_from_slice(b"IS\0\0");
            b.extend_from_slice(&6u32.to_le_bytes());
            b.extend_from_slice(&(values.len() as u32).to_le_bytes());
            b.extend_from_slice(&77u32.to_le_bytes());
            for v in *values {
                let len = v.len() as u32 + 1;
                for x in [len, len, 77, len] {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                b.extend_from_slice(v.as_bytes());
                b.push(0);
                b.resize(b.len() + (4 - len as usize % 4) % 4, 0);
            }
        }
        b
    }

    #[test]
    fn reads_csa2_and_refuses_damaged_headers() {
        let b = csa(&[
            ("NumberOfImagesInMosaic", &["5"]),
            ("SliceNormalVector", &["0.0", "0.1", "-0.99"]),
            ("Empty", &[]),
        ]);
        let f = parse_csa(&b).unwrap();
        assert_eq!(f["NumberOfImagesInMosaic"], ["5"]);
        assert_eq!(f["SliceNormalVector"], ["0.0", "0.1", "-0.99"]);
        assert!(f["Empty"].is_empty());
        for len in 0..b.len() - 4 {
            let _ = parse_csa(&b[..len]);
        }
        assert!(parse_csa(&b[..100]).is_err());
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_csa(&huge).is_err());
        assert!(parse_csa(b"CSA1 whatever").is_err());
    }

    #[test]
    fn layout_moves_the_origin_and_steps_along_the_normal() {
        let fields = parse_csa(&csa(&[
            ("NumberOfImagesInMosaic", &["5"]),
            ("SliceNormalVector", &["0", "0", "1"]),
        ]))
        .unwrap();
        let input = MosaicInput {
            rows: 6,
            cols: 9,
            position: [-10.0, -20.0, 5.0],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            pixel_spacing: [2.0, 3.0],
            slice_step: 4.0,
            images: None,
            csa: Some(&fields),
        };
        let l = layout(&input).unwrap();
        assert_eq!((l.images, l.grid, l.tile_rows, l.tile_cols), (5, 3, 2, 3));
        // Half of (6-2) rows × 2 mm along y, half of (9-3) columns × 3 mm along x.
        assert_eq!(l.positions[0], [-1.0, -16.0, 5.0]);
        // col × row = -z for an axial image, flipped to the CSA normal +z.
        assert_eq!(l.positions[4], [-1.0, -16.0, 21.0]);

        let no_csa = MosaicInput {
            csa: None,
            images: Some(7),
            ..input
        };
        let l = layout(&no_csa).unwrap();
        assert_eq!((l.images, l.grid), (7, 3));
        assert_eq!(l.positions[1][2], 5.0 - 4.0);
        let none = MosaicInput {
            images: None,
            ..no_csa
        };
        assert!(
            layout(&none)
                .unwrap_err()
                .contains("NumberOfImagesInMosaic")
        );
    }
}
