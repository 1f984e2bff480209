//! The source series a result was computed from, slice by slice.
//!
//! The label map's first axis runs over the source's slices ordered along the slice
//! normal (row direction × column direction), ascending, as the preprocessor orders
//! them; [`SourceSeries::new`] puts the instances in that order and checks that they
//! form one stack of one series.

use crate::header::SourceInstance;

/// Why instances do not form one source series.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    #[error("no source instances")]
    Empty,
    #[error("the source instances {0}")]
    Inconsistent(&'static str),
}

/// The source series: its instances in slice order.
#[derive(Debug, Clone)]
pub struct SourceSeries {
    slices: Vec<SourceInstance>,
}

impl SourceSeries {
    /// Orders `instances` along the slice normal and checks they share series, Frame of
    /// Reference, orientation, pixel spacing and matrix.
    pub fn new(mut instances: Vec<SourceInstance>) -> Result<Self, SeriesError> {
        let first = instances.first().ok_or(SeriesError::Empty)?.clone();
        for i in &instances {
            if i.series_instance_uid != first.series_instance_uid {
                return Err(SeriesError::Inconsistent("belong to different series"));
            }
            if i.frame_of_reference_uid != first.frame_of_reference_uid {
                return Err(SeriesError::Inconsistent(
                    "have different Frames of Reference",
                ));
            }
            if (i.rows, i.columns) != (first.rows, first.columns) {
                return Err(SeriesError::Inconsistent("have different matrices"));
            }
            let same = i
                .orientation()
                .iter()
                .zip(first.orientation())
                .all(|(a, b)| (a - b).abs() < 1e-4);
            if !same || i.pixel_spacing != first.pixel_spacing {
                return Err(SeriesError::Inconsistent(
                    "have different orientations or pixel spacings",
                ));
            }
            if i.position().iter().any(|v| !v.is_finite())
                || i.orientation().iter().any(|v| !v.is_finite())
            {
                return Err(SeriesError::Inconsistent("have unreadable geometry"));
            }
        }
        let normal = first.normal();
        let along = |i: &SourceInstance| dot(normal, i.position());
        instances.sort_by(|a, b| {
            along(a)
                .total_cmp(&along(b))
                .then_with(|| a.sop_instance_uid.cmp(&b.sop_instance_uid))
        });
        Ok(Self { slices: instances })
    }

    /// The instances in slice order.
    pub fn slices(&self) -> &[SourceInstance] {
        &self.slices
    }

    /// The first slice (shared attributes are read from it).
    pub fn first(&self) -> &SourceInstance {
        &self.slices[0]
    }

    /// The label map shape this series gives: `(slices, rows, columns)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        let f = self.first();
        (
            self.slices.len(),
            usize::from(f.rows),
            usize::from(f.columns),
        )
    }

    /// Distance between neighbouring slices along the normal in mm (the mean step), or
    /// the Slice Thickness for a single slice.
    pub fn slice_spacing(&self) -> Option<f64> {
        let n = self.slices.len();
        if n < 2 {
            return self
                .first()
                .slice_thickness
                .as_deref()
                .and_then(|s| s.parse().ok());
        }
        let normal = self.first().normal();
        let span =
            dot(normal, self.slices[n - 1].position()) - dot(normal, self.slices[0].position());
        Some(span / (n - 1) as f64)
    }
}

impl SourceInstance {
    /// The slice normal: row direction × column direction.
    pub fn normal(&self) -> [f64; 3] {
        let o = self.orientation();
        let (r, c) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        [
            r[1] * c[2] - r[2] * c[1],
            r[2] * c[0] - r[0] * c[2],
            r[0] * c[1] - r[1] * c[0],
        ]
    }
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
