//! The models an inferer serves, and how they change while it runs.
//!
//! An inferer serves every model of its registry at once ([`ModelSet`]). Loading is
//! per model: a model whose file is missing, whose checksum does not match or that
//! ONNX Runtime refuses is reported (log, `radflow_model_load_failures`) and its jobs
//! wait in the queue, while the others serve.
//!
//! The registry file is watched ([`RegistryWatch`]: its content is compared every few
//! seconds, which also catches Kubernetes ConfigMap updates, where the file is replaced
//! through a symbolic link and its modification time is not to be trusted). When it
//! changes, [`ModelHub::reload`] loads and warms up only what is new or changed, keeps
//! every unchanged model (same `name@version` and the same entry) with its warm
//! session, and then swaps the whole set in one step: a job always sees a consistent
//! set, and the models that did not change never stop serving. A registry that does
//! not parse is reported and ignored.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use radflow_shared::events::VolumeReady;
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{ModelKind, Registry, RegistryError};

use crate::classify::Batcher;
use crate::session::{self, ExecutionConfig, LoadedModel, ModelError};

/// One model being served.
pub struct ServedModel {
    /// The warm session.
    pub model: Arc<LoadedModel>,
    /// Classification models batch jobs; the batcher starts with the first job.
    batcher: OnceLock<Batcher>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.model.fmt(f)
    }
}

impl ServedModel {
    fn new(model: LoadedModel) -> Self {
        Self {
            model: Arc::new(model),
            batcher: OnceLock::new(),
        }
    }

    /// The model's job batcher, started on first use.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn batcher(&self, metrics: &Arc<Metrics>) -> &Batcher {
        self.batcher
            .get_or_init(|| Batcher::start(self.model.clone(), metrics.clone()))
    }
}

/// The models of one registry: loaded and warm, or failed with the reason.
pub struct ModelSet {
    /// The registry this set was loaded from.
    pub registry: Arc<Registry>,
    /// Serving models by `name@version`.
    pub loaded: BTreeMap<String, Arc<ServedModel>>,
    /// Models that could not be loaded, by `name@version`, with the error.
    pub failed: BTreeMap<String, String>,
}

impl ModelSet {
    /// The model for a job, or why it cannot be served (it failed to load, or this
    /// inferer's registry does not list it).
    pub fn get(&self, reference: &str) -> Result<Arc<ServedModel>, String> {
        if let Some(m) = self.loaded.get(reference) {
            return Ok(m.clone());
        }
        Err(self
            .failed
            .get(reference)
            .cloned()
            .unwrap_or_else(|| format!("model {reference} is not in this inferer's registry")))
    }

    /// The model that runs a job: the version it names or, when that version was
    /// retired (the registry serves a newer version of the name, with the same input
    /// preset), the serving version, so that jobs queued before a rollout still get
    /// a result. A job for a version newer than any this inferer has is not served
    /// yet: the registry reload that brings it is on its way.
    pub fn serve(&self, job: &VolumeReady) -> Result<Arc<ServedModel>, String> {
        let requested = job.model_ref();
        let retired = !self
            .registry
            .models
            .iter()
            .any(|m| m.reference() == requested);
        if retired
            && let Some(serving) = self.registry.serving(&job.model)
            && serving.preset.name == job.preset
            && version_order(&job.model_version, &serving.version) == Some(Ordering::Less)
        {
            let model = self.get(&serving.reference())?;
            tracing::warn!(
                series_uid = %job.series_uid,
                requested = %requested,
                serving = %serving.reference(),
                "the job's model version was retired; running the serving version"
            );
            return Ok(model);
        }
        self.get(&requested)
    }

    /// The job subjects to consume (model names) with the messages each consumer
    /// should hold at once: `base` for segmentation, at least the batch size for
    /// classification so a batch can fill.
    pub fn consumers(&self, base: usize) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for m in &self.registry.models {
            let want = match m.kind {
                ModelKind::Segmentation => base,
                ModelKind::Classification => base.max(m.batch_size),
            };
            let entry = out.entry(m.name.clone()).or_insert(want);
            *entry = (*entry).max(want);
        }
        out
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Unchanged models that kept their sessions.
    pub kept: Vec<String>,
    /// New or changed models loaded and warmed up.
    pub loaded: Vec<String>,
    /// Models no longer in the registry (or replaced).
    pub removed: Vec<String>,
    /// Models that failed to load, with the reason.
    pub failed: Vec<(String, String)>,
}

/// The current [`ModelSet`], replaced as a whole on reload.
pub struct ModelHub {
    current: RwLock<Arc<ModelSet>>,
    exec: ExecutionConfig,
    metrics: Arc<Metrics>,
}

impl ModelHub {
    /// Loads and warms up every model of `registry` (blocking: minutes for large models
    /// on a GPU). Never fails as a whole; see [`ModelSet::failed`].
    pub fn load(registry: Registry, exec: ExecutionConfig, metrics: Arc<Metrics>) -> Self {
        let hub = Self {
            current: RwLock::new(Arc::new(ModelSet {
                registry: Arc::new(Registry {
                    models: Vec::new(),
                    base_dir: None,
                }),
                loaded: BTreeMap::new(),
                failed: BTreeMap::new(),
            })),
            exec,
            metrics,
        };
        hub.reload(registry);
        hub
    }

    /// The set serving now.
    pub fn current(&self) -> Arc<ModelSet> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Settings sessions are created with.
    pub fn execution(&self) -> &ExecutionConfig {
        &self.exec
    }

    /// The provider and version gauges of a model that starts (`on`) or stops serving.
    fn serving_metrics(&self, served: &ServedModel, on: bool) {
        let (model, spec) = (&served.model, &served.model.spec);
        if on {
            self.metrics.provider(&spec.name, model.provider.as_str());
        } else {
            self.metrics
                .provider_unset(&spec.name, model.provider.as_str());
        }
        self.metrics
            .model_info(&spec.name, &spec.version, &model.sha256, spec.shadow, on);
    }

    /// Moves to `registry`: keeps unchanged models, loads the others (blocking), then
    /// swaps the set.
    pub fn reload(&self, registry: Registry) -> ReloadReport {
        let old = self.current();
        let mut report = ReloadReport::default();
        let mut loaded = BTreeMap::new();
        let mut failed = BTreeMap::new();
        let same_base = old.registry.base_dir == registry.base_dir;
        for spec in &registry.models {
            let reference = spec.reference();
            if let Some(served) = old.loaded.get(&reference)
                && same_base
                && served.model.spec == *spec
            {
                report.kept.push(reference.clone());
                loaded.insert(reference, served.clone());
                continue;
            }
            match load_one(spec, registry.base_dir.as_deref(), &self.exec) {
                Ok(model) => {
                    report.loaded.push(reference.clone());
                    loaded.insert(reference, Arc::new(ServedModel::new(model)));
                }
                Err(e) => {
                    self.metrics.model_load_failure(&spec.name);
                    tracing::error!(model = %reference, error = %e, "model failed to load; the other models keep serving");
                    report.failed.push((reference.clone(), e.to_string()));
                    failed.insert(reference, e.to_string());
                }
            }
        }
        for (reference, served) in &old.loaded {
            let still = loaded
                .get(reference)
                .is_some_and(|now| Arc::ptr_eq(now, served));
            if !still {
                report.removed.push(reference.clone());
                self.serving_metrics(served, false);
            }
        }
        for served in loaded.values() {
            self.serving_metrics(served, true);
        }
        self.metrics.models_loaded(loaded.len());
        let set = Arc::new(ModelSet {
            registry: Arc::new(registry),
            loaded,
            failed,
        });
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
        report
    }
}

/// Reads, checks, opens and warms up one model.
fn load_one(
    spec: &radflow_shared::models::ModelSpec,
    base_dir: Option<&Path>,
    exec: &ExecutionConfig,
) -> Result<LoadedModel, ModelError> {
    let bytes = session::read_model(spec, base_dir)?;
    session::load(spec, &bytes, exec)
}

/// Watches a registry file for changes of its content.
#[derive(Debug, Clone)]
pub struct RegistryWatch {
    /// The registry file (`--models`).
    pub path: PathBuf,
    /// How often it is read.
    pub interval: Duration,
    last: Option<String>,
}

impl RegistryWatch {
    /// Watches `path` every `interval`.
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        Self {
            path,
            interval,
            last: None,
        }
    }

    /// Reads the file; returns the registry it now holds when its content changed
    /// since the last call and differs from `current`, or the error when it changed
    /// and cannot be used. An unchanged or unreadable-but-unchanged file gives `None`.
    pub fn poll(&mut self, current: &Registry) -> Option<Result<Registry, RegistryError>> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(source) => {
                let digest = format!("unreadable: {}", source.kind());
                if self.last.as_deref() == Some(digest.as_str()) {
                    return None;
                }
                self.last = Some(digest);
                return Some(Err(RegistryError::Read {
                    path: self.path.clone(),
                    source,
                }));
            }
        };
        let digest = session::sha256_hex(&text);
        if self.last.as_deref() == Some(digest.as_str()) {
            return None;
        }
        self.last = Some(digest);
        let parsed = String::from_utf8(text)
            .map_err(|e| RegistryError::Invalid(format!("the file is not UTF-8: {e}")))
            .and_then(|text| Registry::parse(&text, self.path.parent().map(Path::to_owned)));
        match parsed {
            Ok(registry) if registry == *current => None,
            other => Some(other),
        }
    }
}

/// Orders dotted versions (`1.10.0` after `1.9.2`) part by part, numerically where
/// both parts are numbers; `None` when they cannot be compared that way.
pub fn version_order(a: &str, b: &str) -> Option<Ordering> {
    let parts = |v: &str| -> Option<Vec<u64>> {
        v.split(['.', '-', '_']).map(|p| p.parse().ok()).collect()
    };
    let (a, b) = (parts(a)?, parts(b)?);
    Some(a.cmp(&b))
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_order("1.0.0", "1.1.0"), Some(Ordering::Less));
        assert_eq!(version_order("1.10.0", "1.9.2"), Some(Ordering::Greater));
        assert_eq!(version_order("2", "2"), Some(Ordering::Equal));
        assert_eq!(version_order("1.0-rc1", "1.0"), None);
    }
}
