//! What the header of a stored DICOM file says about its images: one [`SliceHeader`]
//! per image (a slice, a frame of an enhanced object, a tile of a mosaic), and in
//! [`InstanceHeader`] how the file's pixels are stored and turned into physical values.
//!
//! Plain values: [`crate::decode`] reads them from a file and decodes pixels after
//! them; [`crate::select`] and [`crate::geometry`] work on them alone.

use crate::scan;

/// Header facts of one image (a slice, a frame or a mosaic tile), enough to place it
/// in space, to decide whether it belongs in a volume and to route its series.
///
/// Deliberately holds no patient demographics (names, IDs, birth dates, accession
/// numbers): this value is logged, compared and copied into events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SliceHeader {
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: String,
    /// Instance Number (0020,0013); informative only, never used for ordering.
    pub instance_number: Option<i32>,
    /// Image Position (Patient) (0020,0032): centre of the first pixel, LPS mm.
    pub image_position: Option<[f64; 3]>,
    /// Image Orientation (Patient) (0020,0037): row cosine then column cosine, LPS.
    pub image_orientation: Option<[f64; 6]>,
    /// Pixel Spacing (0028,0030) as in DICOM: `[row spacing, column spacing]` mm, i.e.
    /// the distance between rows first (along a column), then between columns.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Rows of this image (of one tile for a mosaic).
    pub rows: usize,
    /// Columns of this image (of one tile for a mosaic).
    pub cols: usize,
    /// Number of Frames (0028,0008) of the object; 1 when absent.
    pub number_of_frames: u32,
    /// Frame of the object this image is (0-based; 0 for single-frame objects).
    pub frame: u32,
    /// Where this image lies in a Siemens mosaic, if it is a mosaic tile.
    pub tile: Option<MosaicTile>,
    /// Modality (0008,0060), e.g. `CT`.
    pub modality: String,
    /// Body Part Examined (0008,0015), may be empty.
    pub body_part: String,
    /// Series Description (0008,103E), may be empty.
    pub series_description: String,
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// Series Instance UID (0020,000E).
    pub series_uid: String,
    /// Study Date (0008,0020) as `YYYYMMDD`, may be empty (selection by date).
    pub study_date: String,
    /// Image Type (0008,0008) values, e.g. `["ORIGINAL", "PRIMARY", "AXIAL"]`; for a
    /// frame of an enhanced object, its Frame Type (0008,9007) when present.
    pub image_type: Vec<String>,
    /// Photometric Interpretation (0028,0004) as stored.
    pub photometric: String,
    /// Samples per Pixel (0028,0002); 1 for greyscale.
    pub samples_per_pixel: u16,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// Transfer syntax UID of the file.
    pub transfer_syntax: String,
    /// Modality LUT applied to the pixels: `(slope, intercept)`; `(1, 0)` when absent.
    pub rescale: (f64, f64),
    /// Slice Thickness (0018,0050) in mm.
    pub slice_thickness: Option<f64>,
}

impl SliceHeader {
    /// Whether the image holds one grey value per pixel.
    pub fn is_greyscale(&self) -> bool {
        self.samples_per_pixel == 1
            && matches!(
                self.photometric.as_str(),
                "MONOCHROME1" | "MONOCHROME2" | ""
            )
    }
}

/// Position of a tile in a mosaic grid (0-based, row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MosaicTile {
    /// Slice number in the mosaic.
    pub index: u32,
    /// Tiles per side of the grid.
    pub grid: u32,
}

/// One decoded image: header and pixel values in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSlice {
    pub header: SliceHeader,
    /// `rows * cols` values, row-major (column index fastest), modality LUT applied,
    /// `MONOCHROME1` inverted so that larger is brighter, padding masked (see
    /// [`crate::decode`]).
    pub pixels: Vec<f32>,
}

/// Everything [`crate::decode::read_header`] learnt about a file: its images, and how to decode them.
#[derive(Debug, Clone)]
pub struct InstanceHeader {
    /// One header per image the object holds (slice, frame or mosaic tile), in frame
    /// order.
    pub images: Vec<SliceHeader>,
    /// How to decode them ([`crate::decode`]).
    pub(crate) plan: PixelPlan,
}

/// How the pixel data of a file is laid out and converted.
#[derive(Debug, Clone)]
pub(crate) struct PixelPlan {
    pub(crate) ts_uid: String,
    pub(crate) ts_name: String,
    pub(crate) storage: Storage,
    /// The bit layout, or why the images cannot be decoded; only an error once an image
    /// of this file is chosen for a volume.
    pub(crate) format: Result<SampleFormat, String>,
    /// Rows and columns of a whole frame (the mosaic, for mosaics).
    pub(crate) frame_rows: usize,
    pub(crate) frame_cols: usize,
    pub(crate) frames: u32,
    /// Undefined-length UN elements to make opaque before parsing the whole file.
    pub(crate) opaque_un: Vec<scan::OpaqueUn>,
    /// Whether the data set is big endian (for the length fields of `opaque_un`).
    pub(crate) big_endian: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Storage {
    /// Uncompressed, at `offset` of the file, `len` bytes.
    Native {
        offset: usize,
        len: usize,
        endian: Endian,
    },
    /// Encapsulated fragments of `len` bytes in all, decoded by a codec.
    Encapsulated { len: usize },
    /// Uncompressed inside a deflated data set.
    Deflated,
}

/// Byte order of stored samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Endian {
    Little,
    Big,
}

impl Endian {
    pub(crate) fn native() -> Self {
        if cfg!(target_endian = "big") {
            Endian::Big
        } else {
            Endian::Little
        }
    }
}

/// How stored samples become physical values (the rescale is per image).
#[derive(Debug, Clone)]
pub(crate) struct SampleFormat {
    pub(crate) bits_allocated: u16,
    pub(crate) bits_stored: u16,
    /// Right shift that brings the stored bits to bit 0 (`high_bit + 1 - bits_stored`).
    pub(crate) shift: u16,
    pub(crate) signed: bool,
    pub(crate) monochrome1: bool,
    /// Pixel Padding Value and optional Range Limit, in stored units.
    pub(crate) padding: Option<(i64, i64)>,
    /// What padding becomes: a fixed value (air, -1024 HU, for CT), else the smallest
    /// other value of the image.
    pub(crate) pad_to: Option<f32>,
}

impl SampleFormat {
    pub(crate) fn bytes_per_sample(&self) -> usize {
        usize::from(self.bits_allocated / 8)
    }

    /// Stored (sign-extended) value of the raw container bits.
    #[inline(always)]
    pub(crate) fn stored(&self, raw: u32) -> i64 {
        let up = 32 - u32::from(self.bits_stored);
        let v = (raw >> self.shift) << up;
        if self.signed {
            i64::from((v as i32) >> up)
        } else {
            i64::from(v >> up)
        }
    }

    /// Smallest and largest stored values representable.
    pub(crate) fn stored_range(&self) -> (i64, i64) {
        let b = u32::from(self.bits_stored);
        if self.signed {
            (-(1i64 << (b - 1)), (1i64 << (b - 1)) - 1)
        } else {
            (0, (1i64 << b) - 1)
        }
    }
}

#[cfg(test)]
impl InstanceHeader {
    /// A header of one image that cannot be decoded, for tests of selection.
    pub(crate) fn for_tests(image: SliceHeader) -> Self {
        let plan = PixelPlan {
            ts_uid: String::new(),
            ts_name: String::new(),
            storage: Storage::Deflated,
            format: Err("test header".into()),
            frame_rows: image.rows,
            frame_cols: image.cols,
            frames: 1,
            opaque_un: Vec::new(),
            big_endian: false,
        };
        InstanceHeader {
            images: vec![image],
            plan,
        }
    }
}
