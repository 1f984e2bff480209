//! Classification models: one set of class scores per volume, with jobs batched.
//!
//! A classification model takes the whole prepared volume at a fixed shape (the
//! registry's `patch`; the preset's `shape` should produce it, and a volume of another
//! size is cropped or padded about its centre here). Because every job has the same
//! input shape, jobs that arrive together can share one `session.run`: the
//! [`Batcher`] of a model collects up to `batch_size` jobs, waiting at most
//! `batch_wait_ms` after the first, runs them as one batch and hands each job its row
//! of scores. On a GPU that is the difference between a busy and an idle accelerator
//! when a worklist of studies arrives at once.
//!
//! Scores become probabilities by the registry's activation (softmax for exclusive
//! classes, sigmoid for independent findings) and are compared with each class's
//! threshold.

use std::sync::Arc;
use std::time::Duration;

use ndarray::{Array3, Array5, ArrayView3, s};
use radflow_shared::events::ClassScore;
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{Activation, ModelSpec, WindowPadding};
use tokio::sync::{mpsc, oneshot};

use crate::session::{LoadedModel, ModelError};

/// `image` (`[D, H, W]`) cropped or padded about its centre to `patch`: an axis longer
/// than the patch keeps its middle (the first voxel kept is `(n − p) / 2`), a shorter
/// one gets `(p − n) / 2` voxels before it, filled with zeros or the edge value.
pub fn fit_to_patch(
    image: ArrayView3<f32>,
    patch: [usize; 3],
    padding: WindowPadding,
) -> Array3<f32> {
    let size: [usize; 3] = image.dim().into();
    if size == patch {
        return image.to_owned();
    }
    // Source index = destination index + offset.
    let offset: [isize; 3] = std::array::from_fn(|a| {
        if size[a] >= patch[a] {
            ((size[a] - patch[a]) / 2) as isize
        } else {
            -(((patch[a] - size[a]) / 2) as isize)
        }
    });
    let source = |a: usize, i: usize| i as isize + offset[a];
    Array3::from_shape_fn((patch[0], patch[1], patch[2]), |(z, y, x)| {
        let idx = [source(0, z), source(1, y), source(2, x)];
        let inside = (0..3).all(|a| (0..size[a] as isize).contains(&idx[a]));
        match padding {
            WindowPadding::Constant if !inside => 0.0,
            _ => {
                let clamp = |a: usize| idx[a].clamp(0, size[a] as isize - 1) as usize;
                image[[clamp(0), clamp(1), clamp(2)]]
            }
        }
    })
}

/// The registry's classes with their scores (after the activation) and, where a class
/// has a threshold, whether it was reached.
pub fn class_scores(raw: &[f32], spec: &ModelSpec) -> Result<Vec<ClassScore>, ModelError> {
    let values: Vec<f64> = match spec.activation {
        Activation::Softmax => {
            let max = raw
                .iter()
                .map(|&v| f64::from(v))
                .fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = raw.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.into_iter().map(|e| e / sum).collect()
        }
        Activation::Sigmoid => raw
            .iter()
            .map(|&v| 1.0 / (1.0 + (-f64::from(v)).exp()))
            .collect(),
        Activation::None => raw.iter().map(|&v| f64::from(v)).collect(),
    };
    spec.labels
        .iter()
        .map(|class| {
            let score =
                *values
                    .get(usize::from(class.index))
                    .ok_or_else(|| ModelError::Output {
                        model: spec.reference(),
                        reason: format!(
                            "class {} has index {} but the model gave {} scores",
                            class.name,
                            class.index,
                            values.len()
                        ),
                    })?;
            Ok(ClassScore {
                index: class.index,
                name: class.name.clone(),
                score,
                positive: class.threshold.map(|t| score >= t),
            })
        })
        .collect()
}

/// One job's scores and the batch it ran in.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The model's raw output row.
    pub scores: Vec<f32>,
    /// Jobs in the batch.
    pub batch: usize,
    /// Time of the batch's `session.run`.
    pub run_time: Duration,
}

struct Request {
    input: Array3<f32>,
    reply: oneshot::Sender<Result<Scored, ModelError>>,
}

/// Collects the jobs of one classification model into batches. Cheap to share; the
/// batching task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    model: Arc<LoadedModel>,
}

impl Batcher {
    /// Starts the batching task on the current Tokio runtime.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn start(model: Arc<LoadedModel>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(model.spec.batch_size * 4);
        tokio::spawn(serve(model.clone(), rx, metrics));
        Self { tx, model }
    }

    /// Scores one volume, already fitted to the model's patch (`[D, H, W]`), in the
    /// next batch.
    pub async fn classify(&self, input: Array3<f32>) -> Result<Scored, ModelError> {
        let gone = || ModelError::Run {
            model: self.model.spec.reference(),
            reason: "the model was unloaded while the job waited".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { input, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The batching loop: first job, then whatever else arrives within the wait, one run.
async fn serve(model: Arc<LoadedModel>, mut rx: mpsc::Receiver<Request>, metrics: Arc<Metrics>) {
    let spec = &model.spec;
    let [d, h, w] = spec.patch;
    let wait = Duration::from_millis(spec.batch_wait_ms);
    // Reused for every batch; moved into the blocking task and back.
    let mut buffer = Array5::<f32>::zeros((spec.batch_size, 1, d, h, w));
    while let Some(first) = rx.recv().await {
        let mut requests = vec![first];
        let deadline = tokio::time::Instant::now() + wait;
        while requests.len() < spec.batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(request)) => requests.push(request),
                Ok(None) | Err(_) => break,
            }
        }
        let n = requests.len();
        let mut wrong_shape = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if r.input.dim() != (d, h, w) {
                wrong_shape.push(i);
                continue;
            }
            buffer.slice_mut(s![i, 0, .., .., ..]).assign(&r.input);
        }
        buffer.slice_mut(s![n.., .., .., .., ..]).fill(0.0);
        let m = model.clone();
        let slots = if model.fixed_batch() {
            spec.batch_size
        } else {
            n
        };
        let (returned, result) = match tokio::task::spawn_blocking(move || {
            let result = m.run_scores(buffer.slice(s![..slots, .., .., .., ..]));
            if result.is_ok() && slots > n {
                m.uncount_padding(slots - n);
            }
            (buffer, result)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                for r in requests {
                    let _ = r.reply.send(Err(ModelError::Run {
                        model: spec.reference(),
                        reason: format!("the batch task failed: {e}"),
                    }));
                }
                buffer = Array5::zeros((spec.batch_size, 1, d, h, w));
                continue;
            }
        };
        buffer = returned;
        match result {
            Ok((scores, run_time)) => {
                metrics.inference(&spec.name, run_time.as_secs_f64(), n);
                for (i, r) in requests.into_iter().enumerate() {
                    let answer = if wrong_shape.contains(&i) {
                        Err(ModelError::Window(format!(
                            "input {:?} is not the patch {:?}",
                            r.input.dim(),
                            spec.patch
                        )))
                    } else {
                        Ok(Scored {
                            scores: scores.row(i).to_vec(),
                            batch: n,
                            run_time,
                        })
                    };
                    let _ = r.reply.send(answer);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for r in requests {
                    let _ = r.reply.send(Err(ModelError::Run {
                        model: spec.reference(),
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;
    use radflow_shared::models::Registry;

    #[test]
    fn fitting_crops_and_pads_about_the_centre() {
        let image = Array::from_shape_fn((5, 2, 4), |(z, y, x)| (z * 100 + y * 10 + x + 1) as f32);
        let fitted = fit_to_patch(image.view(), [3, 4, 4], WindowPadding::Constant);
        // z: 5 → 3 keeps 1..4; y: 2 → 4 pads one before and one after; x unchanged.
        assert_eq!(fitted[[0, 1, 0]], 101.0);
        assert_eq!(fitted[[2, 2, 3]], 314.0);
        assert_eq!(fitted[[0, 0, 0]], 0.0);
        assert_eq!(fitted[[0, 3, 2]], 0.0);
        let edge = fit_to_patch(image.view(), [3, 4, 4], WindowPadding::Edge);
        assert_eq!(edge[[0, 0, 1]], 102.0);
        assert_eq!(edge[[1, 3, 2]], 213.0);
        // Odd differences, like the sliding window: 4 → 7 pads one before, two after.
        let grown = fit_to_patch(image.view(), [5, 2, 7], WindowPadding::Constant);
        let row: Vec<f32> = grown.slice(s![0, 0, ..]).to_vec();
        assert_eq!(row, vec![0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0]);
        assert_eq!(
            fit_to_patch(image.view(), [5, 2, 4], WindowPadding::Edge),
            image
        );
    }

    fn spec(activation: Activation) -> ModelSpec {
        let mut spec = Registry::builtin().models[0].clone();
        spec.kind = radflow_shared::models::ModelKind::Classification;
        spec.activation = activation;
        spec.labels.truncate(3);
        spec.labels[1].threshold = Some(0.5);
        spec
    }

    #[test]
    fn scores_follow_the_activation_and_thresholds() {
        let raw = [1.0f32, 2.0, 0.5];
        let soft = class_scores(&raw, &spec(Activation::Softmax)).unwrap();
        let e: Vec<f64> = raw.iter().map(|&v| f64::from(v).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (c, expected) in soft.iter().zip(&e) {
            assert!((c.score - expected / sum).abs() < 1e-12);
        }
        assert_eq!(soft[1].positive, Some(true));
        assert_eq!(soft[0].positive, None);

        let sig = class_scores(&[0.0, -1.0, 3.0], &spec(Activation::Sigmoid)).unwrap();
        assert_eq!(sig[0].score, 0.5);
        assert_eq!(sig[1].positive, Some(false));
        let none = class_scores(&raw, &spec(Activation::None)).unwrap();
        assert_eq!(none[1].score, 2.0);

        let err = class_scores(&[1.0, 2.0], &spec(Activation::None)).unwrap_err();
        assert!(err.to_string().contains("gave 2 scores"), "{err}");
    }
}
