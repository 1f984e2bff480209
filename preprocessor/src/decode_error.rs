//! Why a stored file could not be read or decoded: the one error of [`crate::scan`],
//! [`crate::decode`] and the header reading between them.

/// Why a file could not be decoded. Every message is a sentence for an operator and
/// never contains patient demographics.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a DICOM Part-10 file.
    #[error("not a DICOM file: {0}")]
    NotDicom(String),
    /// The file is structurally broken (bad element lengths, nesting, parse failure).
    #[error("the DICOM file is malformed: {0}")]
    Malformed(String),
    /// The file holds no image pixel data (e.g. a structured report).
    #[error("the DICOM file has no pixel data (SOP class {sop_class_uid}); it is not an image")]
    NoPixelData { sop_class_uid: String },
    /// A file that is not a cross-sectional image by its meta group (a plan, a report,
    /// a private object) and could not be read; a series leaves it out.
    #[error("the DICOM object (SOP class {sop_class_uid}) cannot be read: {detail}")]
    UnreadableObject {
        sop_class_uid: String,
        detail: String,
    },
    /// The transfer syntax is unknown or its pixel data cannot be decoded here.
    #[error("transfer syntax {uid} ({name}) cannot be decoded")]
    UnsupportedTransferSyntax { uid: String, name: String },
    /// The file ends before all the pixel data it declares.
    #[error("pixel data is truncated: {expected} bytes are needed but only {present} are present")]
    TruncatedPixelData { expected: usize, present: usize },
    /// A multi-frame object where one image was expected
    /// ([`crate::decode::read_slice`]).
    #[error("the object holds {frames} images where one was expected")]
    MultiFrame { frames: u32 },
    /// A Siemens mosaic that cannot be cut into its slices.
    #[error("Siemens mosaic image cannot be split into slices: {0}")]
    Mosaic(String),
    /// A valid image of a kind this decoder does not handle (colour, odd bit depth…).
    #[error("unsupported image: {0}")]
    UnsupportedImage(String),
    /// The image would decode to more memory than allowed.
    #[error("the image would decode to {bytes} bytes, more than the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    /// The compressed pixel data could not be decoded.
    #[error("the {syntax} pixel data could not be decoded: {detail}")]
    Codec { syntax: String, detail: String },
}
