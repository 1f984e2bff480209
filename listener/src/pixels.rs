//! What the Pixel Data of an instance must look like, from the attributes that describe
//! it (PS3.3 C.7.6.3 Image Pixel module) and the transfer syntax (PS3.5 8 and A.4).
//!
//! The listener answers a C-STORE only after it has judged these rules, so a sender
//! learns at once that an instance cannot be used, instead of the pipeline finding out
//! later: native pixel data must hold every sample that Rows × Columns × Samples per
//! Pixel × Bits Allocated × Number of Frames promise; pixel data under a compressed
//! transfer syntax must be encapsulated, with at least one fragment per frame; under a
//! native syntax it must not be. Longer native data than promised is kept (vendors pad),
//! and nothing here decodes or allocates from a claimed size.

use std::fmt;

/// Why the pixel data of an instance cannot be what its attributes describe. Messages
/// name attributes and numbers, never values of patient attributes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelError {
    /// An attribute that Pixel Data needs is absent or unusable.
    #[error("Pixel Data is present but {0} is missing or invalid")]
    Attribute(&'static str),
    /// Native pixel data with fewer bytes than the image needs.
    #[error("Pixel Data holds {actual} bytes but {image} needs {expected}")]
    Short {
        /// Bytes in the element.
        actual: u64,
        /// Bytes the image attributes call for.
        expected: u128,
        /// The image, as `rows × columns × samples × bits, frames`.
        image: ImageShape,
    },
    /// Native pixel data under a transfer syntax that requires encapsulation.
    #[error("Pixel Data is not encapsulated, but transfer syntax {0} requires it (PS3.5 A.4)")]
    NotEncapsulated(String),
    /// Encapsulated pixel data under a native transfer syntax.
    #[error("Pixel Data is encapsulated, but transfer syntax {0} is a native one")]
    Encapsulated(String),
    /// Fewer fragments than frames: every frame needs a fragment of its own.
    #[error("Pixel Data has {fragments} fragment(s) for {frames} frame(s)")]
    TooFewFragments {
        /// Fragments after the Basic Offset Table item.
        fragments: u64,
        /// Number of Frames.
        frames: u64,
    },
}

/// The attributes that fix the size of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageShape {
    /// Rows (0028,0010).
    pub rows: u16,
    /// Columns (0028,0011).
    pub columns: u16,
    /// Samples per Pixel (0028,0002).
    pub samples: u16,
    /// Bits Allocated (0028,0100).
    pub bits_allocated: u16,
    /// Number of Frames (0028,0008); 1 when absent.
    pub frames: u64,
    /// Whether the Photometric Interpretation is YBR_FULL_422 or YBR_PARTIAL_422, whose
    /// native encoding stores two chroma samples per pair of pixels (PS3.3 C.7.6.3.1.2).
    pub subsampled_422: bool,
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rows × {} columns × {} sample(s) × {} bits × {} frame(s)",
            self.rows, self.columns, self.samples, self.bits_allocated, self.frames
        )
    }
}

impl ImageShape {
    /// Bytes of native pixel data the image needs, without the padding byte.
    pub fn native_bytes(&self) -> u128 {
        let pixels = u128::from(self.rows) * u128::from(self.columns) * u128::from(self.frames);
        let samples = if self.subsampled_422 && self.samples == 3 {
            pixels * 2
        } else {
            pixels * u128::from(self.samples)
        };
        (samples * u128::from(self.bits_allocated)).div_ceil(8)
    }
}

/// The Image Pixel attributes as found in a dataset (raw values are parsed by the
/// scanner), and the rules that follow from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PixelRules {
    /// Rows, Columns, Samples per Pixel, Bits Allocated, when present and numeric.
    pub rows: Option<u16>,
    /// Columns (0028,0011).
    pub columns: Option<u16>,
    /// Samples per Pixel (0028,0002).
    pub samples: Option<u16>,
    /// Bits Allocated (0028,0100).
    pub bits_allocated: Option<u16>,
    /// Number of Frames (0028,0008), when present and a positive integer.
    pub frames: Option<u64>,
    /// Whether Number of Frames is present but not a positive integer.
    pub frames_invalid: bool,
    /// Whether the Photometric Interpretation is a 4:2:2 YBR one.
    pub subsampled_422: bool,
    /// Whether the transfer syntax encapsulates pixel data.
    pub encapsulated_syntax: bool,
    /// The transfer syntax UID, for messages.
    pub transfer_syntax: String,
}

impl PixelRules {
    /// The shape of a frame, or which attribute is missing.
    pub fn shape(&self) -> Result<ImageShape, PixelError> {
        let rows = self
            .rows
            .filter(|&r| r > 0)
            .ok_or(PixelError::Attribute("Rows (0028,0010)"))?;
        let columns = self
            .columns
            .filter(|&c| c > 0)
            .ok_or(PixelError::Attribute("Columns (0028,0011)"))?;
        // Samples per Pixel is Type 1, but a monochrome image without it is common
        // enough, and unambiguous, to be read as one sample.
        let samples = match self.samples {
            None => 1,
            Some(s @ (1 | 3 | 4)) => s,
            Some(_) => return Err(PixelError::Attribute("Samples per Pixel (0028,0002)")),
        };
        let bits_allocated = match self.bits_allocated {
            Some(b @ (1 | 8 | 16 | 32 | 64)) => b,
            _ => return Err(PixelError::Attribute("Bits Allocated (0028,0100)")),
        };
        if self.frames_invalid {
            return Err(PixelError::Attribute("Number of Frames (0028,0008)"));
        }
        Ok(ImageShape {
            rows,
            columns,
            samples,
            bits_allocated,
            frames: self.frames.unwrap_or(1),
            subsampled_422: self.subsampled_422,
        })
    }

    /// Judge the Pixel Data element header: `length` is `None` when undefined
    /// (encapsulated).
    pub fn check_header(&self, length: Option<u32>) -> Result<(), PixelError> {
        match (length, self.encapsulated_syntax) {
            (Some(_), true) => Err(PixelError::NotEncapsulated(self.transfer_syntax.clone())),
            (None, false) => Err(PixelError::Encapsulated(self.transfer_syntax.clone())),
            (None, true) => self.shape().map(|_| ()),
            (Some(actual), false) => {
                let image = self.shape()?;
                let expected = image.native_bytes();
                if u128::from(actual) < expected {
                    return Err(PixelError::Short {
                        actual: u64::from(actual),
                        expected,
                        image,
                    });
                }
                Ok(())
            }
        }
    }

    /// Judge the fragment count of encapsulated pixel data (items after the Basic
    /// Offset Table).
    pub fn check_fragments(&self, fragments: u64) -> Result<(), PixelError> {
        let frames = self.frames.unwrap_or(1);
        if fragments < frames {
            return Err(PixelError::TooFewFragments { fragments, frames });
        }
        Ok(())
    }
}

/// Whether pixel data under this transfer syntax is encapsulated: every syntax but the
/// native ones (implicit and explicit VR little endian, explicit big endian, deflated).
pub fn is_encapsulated_syntax(ts: &str) -> bool {
    !matches!(
        ts.trim_end_matches(['\0', ' ']),
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(encapsulated: bool) -> PixelRules {
        PixelRules {
            rows: Some(512),
            columns: Some(512),
            samples: Some(1),
            bits_allocated: Some(16),
            encapsulated_syntax: encapsulated,
            transfer_syntax: "x".into(),
            ..Default::default()
        }
    }

    #[test]
    fn native_data_must_hold_every_sample() {
        let rules = ct(false);
        assert_eq!(rules.check_header(Some(512 * 512 * 2)), Ok(()));
        // Longer is kept: vendors pad.
        assert_eq!(rules.check_header(Some(512 * 512 * 2 + 2)), Ok(()));
        let err = rules.check_header(Some(512 * 512)).unwrap_err();
        assert!(
            matches!(
                err,
                PixelError::Short {
                    expected: 524_288,
                    ..
                }
            ),
            "{err}"
        );
        let frames = PixelRules {
            frames: Some(3),
            ..ct(false)
        };
        assert!(frames.check_header(Some(512 * 512 * 2)).is_err());
        assert!(frames.check_header(Some(512 * 512 * 6)).is_ok());
    }

    #[test]
    fn sizes_of_bit_packed_colour_and_subsampled_images() {
        let shape = |samples, bits, frames, sub| ImageShape {
            rows: 3,
            columns: 5,
            samples,
            bits_allocated: bits,
            frames,
            subsampled_422: sub,
        };
        assert_eq!(shape(1, 1, 1, false).native_bytes(), 2); // 15 bits
        assert_eq!(shape(1, 1, 3, false).native_bytes(), 6); // 45 bits
        assert_eq!(shape(3, 8, 1, false).native_bytes(), 45);
        assert_eq!(shape(3, 8, 1, true).native_bytes(), 30);
        // No overflow from absurd attributes.
        let absurd = ImageShape {
            rows: u16::MAX,
            columns: u16::MAX,
            samples: 4,
            bits_allocated: 64,
            frames: u64::MAX,
            subsampled_422: false,
        };
        assert!(absurd.native_bytes() > u128::from(u64::MAX));
    }

    #[test]
    fn encapsulation_must_match_the_syntax() {
        assert!(matches!(
            ct(true).check_header(Some(10)),
            Err(PixelError::NotEncapsulated(_))
        ));
        assert!(matches!(
            ct(false).check_header(None),
            Err(PixelError::Encapsulated(_))
        ));
        assert_eq!(ct(true).check_header(None), Ok(()));
        assert!(is_encapsulated_syntax("1.2.840.10008.1.2.4.70"));
        assert!(is_encapsulated_syntax("1.2.840.10008.1.2.5"));
        assert!(!is_encapsulated_syntax("1.2.840.10008.1.2.1\0"));
        assert!(!is_encapsulated_syntax("1.2.840.10008.1.2.1.99"));
    }

    #[test]
    fn every_frame_needs_a_fragment() {
        let rules = PixelRules {
            frames: Some(4),
            ..ct(true)
        };
        assert!(rules.check_fragments(4).is_ok());
        assert!(rules.check_fragments(9).is_ok());
        assert_eq!(
            rules.check_fragments(3),
            Err(PixelError::TooFewFragments {
                fragments: 3,
                frames: 4
            })
        );
    }

    #[test]
    fn missing_or_impossible_attributes_are_named() {
        for (rules, name) in [
            (
                PixelRules {
                    rows: None,
                    ..ct(false)
                },
                "Rows",
            ),
            (
                PixelRules {
                    rows: Some(0),
                    ..ct(false)
                },
                "Rows",
            ),
            (
                PixelRules {
                    columns: Some(0),
                    ..ct(false)
                },
                "Columns",
            ),
            (
                PixelRules {
                    bits_allocated: Some(12),
                    ..ct(false)
                },
                "Bits Allocated",
            ),
            (
                PixelRules {
                    samples: Some(2),
                    ..ct(false)
                },
                "Samples per Pixel",
            ),
            (
                PixelRules {
                    frames_invalid: true,
                    ..ct(false)
                },
                "Number of Frames",
            ),
        ] {
            let err = rules.check_header(Some(1 << 20)).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let monochrome = PixelRules {
            samples: None,
            ..ct(false)
        };
        assert!(monochrome.check_header(Some(512 * 512 * 2)).is_ok());
    }
}
