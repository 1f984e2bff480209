//! The object store behind a domain API: the only place store keys are spelled.
//!
//! `object_store` gives one interface to a local folder (`file://`), S3-compatible
//! servers (`s3://`) and memory (`memory://`, for tests). Keys are pure functions of
//! identities (study, series, SOP instance, preset, model@version), so a redone step
//! overwrites its own output instead of adding a second one. Layout:
//!
//! ```text
//! dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
//! volumes/<SeriesInstanceUID>/<preset>/volume.nii.gz | meta.json
//! results/<SeriesInstanceUID>/<model>@<version>/summary.json | labels.nii.gz | preview.png
//! ```

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, PutPayload, aws::AmazonS3Builder, local::LocalFileSystem,
    memory::InMemory, path::Path,
};

/// A stored object's key and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// The radflow store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The URL it was opened from, without credentials, for logs.
    url: String,
    /// The folder of a `file://` store, for writers that stream into it directly.
    local_root: Option<PathBuf>,
    /// Whether writes to a `file://` store are flushed before they return.
    fsync: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Which file of a volume.
#[derive(Debug, Clone, Copy)]
pub enum VolumeFile {
    Volume,
    Meta,
}

impl VolumeFile {
    fn name(self) -> &'static str {
        match self {
            Self::Volume => "volume.nii.gz",
            Self::Meta => "meta.json",
        }
    }
}

impl Store {
    /// Opens a store from a URL: `file:///abs/path`, `s3://bucket[/prefix]` (endpoint,
    /// region and credentials from the usual `AWS_*` variables; `AWS_ENDPOINT_URL`
    /// for MinIO and other S3-compatible servers) or `memory://`.
    ///
    /// `fsync` applies to `file://`: every write is flushed to disk (file and folder)
    /// before it returns, so an acknowledged instance survives a power cut.
    pub fn open(url: &str, fsync: bool) -> Result<Self, StoreError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| StoreError::Config(format!("store URL {url:?} is not a URL: {e}")))?;
        let mut local_root = None;
        let inner: Arc<dyn ObjectStore> = match parsed.scheme() {
            "memory" => Arc::new(InMemory::new()),
            "file" => {
                let path = parsed.to_file_path().map_err(|_| {
                    StoreError::Config(format!("store URL {url:?} is not an absolute file path"))
                })?;
                std::fs::create_dir_all(&path).map_err(|e| {
                    StoreError::Config(format!(
                        "cannot create store folder {}: {e}",
                        path.display()
                    ))
                })?;
                local_root = Some(path.clone());
                Arc::new(
                    LocalFileSystem::new_with_prefix(&path)
                        .map_err(|e| StoreError::Config(e.to_string()))?
                        .with_fsync(fsync),
                )
            }
            "s3" => {
                let mut builder = AmazonS3Builder::from_env().with_url(url);
                if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                    builder = path_style_endpoint(builder, &endpoint);
                }
                s3_store(builder, &parsed)?
            }
            other => {
                return Err(StoreError::Config(format!(
                    "store URL scheme {other:?} is not supported (file://, s3://, memory://)"
                )));
            }
        };
        let mut shown = parsed.clone();
        let _ = shown.set_password(None);
        Ok(Self {
            inner,
            url: shown.to_string(),
            local_root,
            fsync,
        })
    }

    /// Opens an `s3://bucket[/prefix]` store on a server given explicitly rather than by
    /// the `AWS_*` environment (tests, tools that talk to several servers).
    pub fn open_s3(url: &str, server: &S3Server) -> Result<Self, StoreError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| StoreError::Config(format!("store URL {url:?} is not a URL: {e}")))?;
        if parsed.scheme() != "s3" {
            return Err(StoreError::Config(format!(
                "store URL {url:?} is not an s3:// URL"
            )));
        }
        let builder = AmazonS3Builder::new()
            .with_url(url)
            .with_region(&server.region)
            .with_access_key_id(&server.access_key)
            .with_secret_access_key(server.secret_key.expose());
        let inner = s3_store(path_style_endpoint(builder, &server.endpoint), &parsed)?;
        Ok(Self {
            inner,
            url: url.to_owned(),
            local_root: None,
            fsync: false,
        })
    }

    /// A store in a local folder (embedded mode).
    pub fn local(dir: &FsPath, fsync: bool) -> Result<Self, StoreError> {
        let abs = absolute(dir)?;
        let url = url::Url::from_directory_path(&abs).map_err(|_| {
            StoreError::Config(format!("{} is not a usable folder path", abs.display()))
        })?;
        Self::open(url.as_str(), fsync)
    }

    /// An empty in-memory store.
    pub fn memory() -> Self {
        Self {
            inner: Arc::new(InMemory::new()),
            url: "memory://".into(),
            local_root: None,
            fsync: false,
        }
    }

    /// The URL the store was opened from (no credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The folder of a `file://` store (keys are paths relative to it); `None` for
    /// other stores.
    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    /// Whether the store is reached over a network (not a local folder nor memory).
    pub fn is_remote(&self) -> bool {
        self.local_root.is_none() && !self.url.starts_with("memory:")
    }

    /// Whether writes to a `file://` store are flushed to disk before they return.
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    // --- keys -------------------------------------------------------------------

    pub fn instance_key(study: &str, series: &str, sop: &str) -> String {
        format!("dicom/{study}/{series}/{sop}.dcm")
    }

    fn series_prefix(study: &str, series: &str) -> String {
        format!("dicom/{study}/{series}/")
    }

    pub fn volume_key(series: &str, preset: &str, file: VolumeFile) -> String {
        format!("volumes/{series}/{preset}/{}", file.name())
    }

    /// `results/<series>/<model>@<version>/`
    pub fn result_prefix(series: &str, model_ref: &str) -> String {
        format!("results/{series}/{model_ref}/")
    }

    pub fn result_key(series: &str, model_ref: &str, name: &str) -> String {
        format!("{}{name}", Self::result_prefix(series, model_ref))
    }

    // --- typed operations ---------------------------------------------------------

    /// Stores a received instance; returns its key.
    pub async fn put_instance(
        &self,
        study: &str,
        series: &str,
        sop: &str,
        file: Bytes,
    ) -> Result<String, StoreError> {
        let key = Self::instance_key(study, series, sop);
        self.put(&key, file).await?;
        Ok(key)
    }

    /// Starts writing a received instance in parts (a large multi-frame object that
    /// should not sit whole in memory). Nothing is visible under the key until
    /// [`InstanceUpload::complete`] returns; [`InstanceUpload::abort`] leaves nothing.
    pub async fn begin_instance_upload(
        &self,
        study: &str,
        series: &str,
        sop: &str,
    ) -> Result<InstanceUpload, StoreError> {
        let key = Self::instance_key(study, series, sop);
        let upload = self
            .inner
            .put_multipart(&Path::from(key.as_str()))
            .await
            .map_err(|e| StoreError::from_object_store("put", &key, e))?;
        Ok(InstanceUpload {
            key,
            upload,
            written: 0,
        })
    }

    /// The instances of a series, sorted by key.
    pub async fn list_instances(
        &self,
        study: &str,
        series: &str,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = self.list(&Self::series_prefix(study, series)).await?;
        out.retain(|o| o.key.ends_with(".dcm"));
        Ok(out)
    }

    /// Every `(study, series)` with at least one stored instance.
    pub async fn list_series(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for study in self.children("dicom/").await? {
            for series in self.children(&format!("dicom/{study}/")).await? {
                out.push((study.clone(), series));
            }
        }
        Ok(out)
    }

    pub async fn put_volume(
        &self,
        series: &str,
        preset: &str,
        file: VolumeFile,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let key = Self::volume_key(series, preset, file);
        self.put(&key, bytes).await?;
        Ok(key)
    }

    pub async fn put_result(
        &self,
        series: &str,
        model_ref: &str,
        name: &str,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let key = Self::result_key(series, model_ref, name);
        self.put(&key, bytes).await?;
        Ok(key)
    }

    /// Whether a series already has a finished result for `model@version`
    /// (`summary.json` is written last).
    pub async fn has_result(&self, series: &str, model_ref: &str) -> Result<bool, StoreError> {
        self.exists(&Self::result_key(series, model_ref, "summary.json"))
            .await
    }

    // --- raw operations -----------------------------------------------------------

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&Path::from(key), PutPayload::from(bytes))
            .await
            .map_err(|e| StoreError::from_object_store("put", key, e))?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self
            .inner
            .get(&Path::from(key))
            .await
            .map_err(|e| StoreError::from_object_store("get", key, e))?;
        result
            .bytes()
            .await
            .map_err(|e| StoreError::from_object_store("get", key, e))
    }

    /// The first `len` bytes of an object (all of it when it is shorter; a range past
    /// the end is clamped, by object_store and by S3 servers alike): one ranged
    /// GET, so reading a header does not fetch the pixel data behind it.
    pub async fn get_prefix(&self, key: &str, len: u64) -> Result<Bytes, StoreError> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(0..len)),
            ..Default::default()
        };
        let result = self
            .inner
            .get_opts(&Path::from(key), options)
            .await
            .map_err(|e| StoreError::from_object_store("get", key, e))?;
        result
            .bytes()
            .await
            .map_err(|e| StoreError::from_object_store("get", key, e))
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.inner.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::from_object_store("head", key, e)),
        }
    }

    /// Every object under a prefix, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let prefix_path = Path::from(prefix.trim_end_matches('/'));
        let mut out: Vec<ObjectInfo> = self
            .inner
            .list(Some(&prefix_path))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
            })
            .try_collect()
            .await
            .map_err(|e| StoreError::from_object_store("list", prefix, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Names of the "folders" directly under a prefix.
    async fn children(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix_path = Path::from(prefix.trim_end_matches('/'));
        let listed = self
            .inner
            .list_with_delimiter(Some(&prefix_path))
            .await
            .map_err(|e| StoreError::from_object_store("list", prefix, e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Removes an object; removing one that is not there is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::from_object_store("delete", key, e)),
        }
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn check(&self) -> Result<(), StoreError> {
        self.inner
            .list_with_delimiter(Some(&Path::from("dicom")))
            .await
            .map(|_| ())
            .map_err(|e| StoreError::from_object_store("list", "dicom/", e))
    }
}

/// An instance being written in parts; see [`Store::begin_instance_upload`].
///
/// Parts are written one at a time, so a slow store slows the sender instead of
/// filling memory. On a folder store the object is staged in a temporary file and
/// renamed into place (flushed first when the store was opened with `fsync`).
#[derive(Debug)]
pub struct InstanceUpload {
    key: String,
    upload: Box<dyn object_store::MultipartUpload>,
    written: u64,
}

impl InstanceUpload {
    /// The key the instance will have.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the next part (S3 wants every part but the last to be at least 5 MiB).
    pub async fn put_part(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let n = bytes.len() as u64;
        self.upload
            .put_part(PutPayload::from(bytes))
            .await
            .map_err(|e| StoreError::from_object_store("put", &self.key, e))?;
        self.written += n;
        Ok(())
    }

    /// Makes the object visible under its key, whole; returns the key.
    pub async fn complete(mut self) -> Result<String, StoreError> {
        self.upload
            .complete()
            .await
            .map_err(|e| StoreError::from_object_store("put", &self.key, e))?;
        Ok(self.key)
    }

    /// Discards what was written.
    pub async fn abort(mut self) {
        if let Err(e) = self.upload.abort().await {
            tracing::debug!(error = %e, "aborting a partial upload failed");
        }
    }
}

/// An S3-compatible server named explicitly (see [`Store::open_s3`]).
#[derive(Debug, Clone)]
pub struct S3Server {
    /// `http(s)://host:port`; requests use path-style addressing.
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: crate::secret::Secret,
}

/// S3-compatible servers other than AWS are addressed path-style (`host/bucket/key`);
/// plain HTTP is allowed only when the endpoint says `http://`.
fn path_style_endpoint(builder: AmazonS3Builder, endpoint: &str) -> AmazonS3Builder {
    builder
        .with_endpoint(endpoint)
        .with_allow_http(endpoint.starts_with("http://"))
        .with_virtual_hosted_style_request(false)
}

fn s3_store(builder: AmazonS3Builder, url: &url::Url) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let s3 = builder
        .build()
        .map_err(|e| StoreError::Config(format!("S3 store: {e}")))?;
    let prefix = url.path().trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
    })
}

fn absolute(dir: &FsPath) -> Result<PathBuf, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Config(format!("cannot create data folder {}: {e}", dir.display()))
    })?;
    std::fs::canonicalize(dir)
        .map_err(|e| StoreError::Config(format!("cannot resolve {}: {e}", dir.display())))
}

/// Store failures, sorted by what a caller does about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object is not there (a permanent condition for that key).
    #[error("{key} is not in the store")]
    NotFound { key: String },
    /// The disk or bucket is full: retry later, after an operator frees space.
    #[error("the store is full while writing {key}: {detail}")]
    Full { key: String, detail: String },
    /// Anything else reaching the store: transient, retry.
    #[error("store {op} of {key} failed: {detail}")]
    Unavailable {
        op: &'static str,
        key: String,
        detail: String,
    },
    /// The store could not be opened as configured.
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    fn from_object_store(op: &'static str, key: &str, e: object_store::Error) -> Self {
        if let object_store::Error::NotFound { .. } = e {
            return Self::NotFound {
                key: key.to_owned(),
            };
        }
        let detail = format!("{e:#}");
        let full = detail.contains("No space left on device")
            || detail.contains("os error 28")
            || detail.contains("Disk quota exceeded")
            || detail.contains("QuotaExceeded");
        if full {
            Self::Full {
                key: key.to_owned(),
                detail,
            }
        } else {
            Self::Unavailable {
                op,
                key: key.to_owned(),
                detail,
            }
        }
    }

    /// Whether retrying later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Full { .. } | Self::Unavailable { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_and_listing() {
        let store = Store::memory();
        store
            .put_instance("1.2", "1.2.3", "1.2.3.4", Bytes::from("a"))
            .await
            .unwrap();
        store
            .put_instance("1.2", "1.2.3", "1.2.3.5", Bytes::from("bb"))
            .await
            .unwrap();
        store
            .put_instance("1.2", "1.2.9", "1.2.9.1", Bytes::from("c"))
            .await
            .unwrap();
        let listed = store.list_instances("1.2", "1.2.3").await.unwrap();
        assert_eq!(
            listed,
            vec![
                ObjectInfo {
                    key: "dicom/1.2/1.2.3/1.2.3.4.dcm".into(),
                    size: 1
                },
                ObjectInfo {
                    key: "dicom/1.2/1.2.3/1.2.3.5.dcm".into(),
                    size: 2
                },
            ]
        );
        assert_eq!(
            store.list_series().await.unwrap(),
            vec![
                ("1.2".to_owned(), "1.2.3".to_owned()),
                ("1.2".to_owned(), "1.2.9".to_owned())
            ]
        );
        assert!(!store.has_result("1.2.3", "m@1").await.unwrap());
        store
            .put_result("1.2.3", "m@1", "summary.json", Bytes::from("{}"))
            .await
            .unwrap();
        assert!(store.has_result("1.2.3", "m@1").await.unwrap());
        assert!(matches!(
            store.get("nope").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn local_folder_store_round_trip() {
        let dir = std::env::temp_dir().join(format!("radflow-store-{}", std::process::id()));
        let store = Store::local(&dir, true).unwrap();
        store
            .put_volume("1.2.3", "p", VolumeFile::Meta, Bytes::from("{}"))
            .await
            .unwrap();
        assert!(dir.join("volumes/1.2.3/p/meta.json").exists());
        assert_eq!(
            store.get("volumes/1.2.3/p/meta.json").await.unwrap(),
            Bytes::from("{}")
        );
        store.check().await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_prefix_is_read_without_the_rest() {
        let dir = std::env::temp_dir().join(format!("radflow-prefix-{}", std::process::id()));
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for store in [Store::memory(), Store::local(&dir, false).unwrap()] {
            store.put("a/b", Bytes::from(bytes.clone())).await.unwrap();
            assert_eq!(store.get_prefix("a/b", 100).await.unwrap(), &bytes[..100]);
            // Longer than the object: all of it.
            assert_eq!(store.get_prefix("a/b", 1 << 20).await.unwrap(), &bytes[..]);
            assert!(matches!(
                store.get_prefix("a/missing", 10).await,
                Err(StoreError::NotFound { .. })
            ));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn instance_uploads_appear_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("radflow-upload-{}", std::process::id()));
        let store = Store::local(&dir, true).unwrap();
        let mut upload = store
            .begin_instance_upload("1.2", "1.2.3", "9")
            .await
            .unwrap();
        upload.put_part(Bytes::from(vec![1u8; 1000])).await.unwrap();
        upload.put_part(Bytes::from(vec![2u8; 10])).await.unwrap();
        assert_eq!(upload.written(), 1010);
        assert!(!store.exists(upload.key()).await.unwrap());
        let key = upload.complete().await.unwrap();
        let got = store.get(&key).await.unwrap();
        assert_eq!(got.len(), 1010);
        assert_eq!((got[999], got[1000]), (1, 2));

        let mut aborted = store
            .begin_instance_upload("1.2", "1.2.3", "10")
            .await
            .unwrap();
        aborted.put_part(Bytes::from(vec![3u8; 100])).await.unwrap();
        let key = aborted.key().to_owned();
        aborted.abort().await;
        assert!(!store.exists(&key).await.unwrap());
        let left: Vec<String> = std::fs::read_dir(dir.join("dicom/1.2/1.2.3"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["9.dcm".to_owned()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_unknown_schemes() {
        assert!(matches!(
            Store::open("ftp://x/y", false),
            Err(StoreError::Config(_))
        ));
    }
}
