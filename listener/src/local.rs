//! Writing received instances straight into a folder store while their PDUs arrive.
//!
//! On a `file://` store the listener does not wait for a whole instance before writing
//! it: each part goes to a staging file beside the final one as soon as it is received
//! (on a blocking thread, so the association keeps reading), and when flushing is on,
//! the kernel is asked to start writing each part to disk at once
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). When the last fragment arrives, what
//! remains is a short `fdatasync`, the rename into place and a sync of the folder: the
//! disk works while the network delivers, instead of after it.
//!
//! The layout is the store's (`dicom/<study>/<series>/<sop>.dcm` under its root) and
//! the staging name is the final name plus `#<digits>`, which `object_store` ignores
//! when it lists a folder, so readers never see a partial file. Folder syncs are
//! shared: associations that finish instances in the same series folder at the same
//! time wait for one `fsync` of that folder (group commit) instead of one each.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Parts queued for the writing thread of one file before the association waits.
const QUEUED_PARTS: usize = 8;

/// A folder store written to directly.
#[derive(Debug)]
pub struct LocalFiles {
    root: PathBuf,
    fsync: bool,
    folders: Mutex<HashMap<PathBuf, Arc<FolderSync>>>,
}

/// Group commit of one folder's `fsync`.
#[derive(Debug, Default)]
struct FolderSync {
    /// Renames into the folder so far (each takes a ticket).
    requested: AtomicU64,
    /// Tickets covered by the last completed sync; held while syncing.
    completed: tokio::sync::Mutex<u64>,
}

impl LocalFiles {
    /// Writes under `root`; flushes to disk when `fsync`.
    pub fn new(root: PathBuf, fsync: bool) -> Arc<Self> {
        Arc::new(Self {
            root,
            fsync,
            folders: Mutex::new(HashMap::new()),
        })
    }

    /// Starts the file for store key `key`.
    pub async fn begin(self: &Arc<Self>, key: &str) -> std::io::Result<LocalFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.root.join(key);
        let suffix = format!(
            "{}{:06}{:09}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed) % 1_000_000,
            radflow_shared::util::now_ms() % 1_000_000_000
        );
        let mut staging = path.clone().into_os_string();
        staging.push("#");
        staging.push(&suffix);
        let staging = PathBuf::from(staging);
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_PARTS);
        let (fsync, root, dest, stage) =
            (self.fsync, self.root.clone(), path.clone(), staging.clone());
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            let folder = dest.parent().expect("keys have folders");
            if !folder.is_dir() {
                create_folders(&root, folder, fsync)?;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&stage)?;
            let mut offset = 0u64;
            while let Some(part) = rx.blocking_recv() {
                file.write_all(&part)?;
                if fsync {
                    start_writeback(&file, offset, part.len() as u64);
                }
                offset += part.len() as u64;
            }
            Ok(file)
        });
        Ok(LocalFile {
            files: self.clone(),
            key: key.to_owned(),
            path,
            staging,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Syncs `folder` so that every rename into it before this call is durable.
    async fn sync_folder(&self, folder: &Path) -> std::io::Result<()> {
        let state = self
            .folders
            .lock()
            .unwrap()
            .entry(folder.to_owned())
            .or_default()
            .clone();
        let ticket = state.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut completed = state.completed.lock().await;
        if *completed >= ticket {
            return Ok(()); // a sync that started after our rename covered it
        }
        let covers = state.requested.load(Ordering::SeqCst);
        let dir = folder.to_owned();
        tokio::task::spawn_blocking(move || File::open(&dir)?.sync_all())
            .await
            .map_err(std::io::Error::other)??;
        *completed = covers;
        Ok(())
    }
}

/// One instance file being written.
#[derive(Debug)]
pub struct LocalFile {
    files: Arc<LocalFiles>,
    key: String,
    path: PathBuf,
    staging: PathBuf,
    tx: Option<mpsc::Sender<Bytes>>,
    /// The writing thread, until it was joined.
    writer: Option<JoinHandle<std::io::Result<File>>>,
}

impl LocalFile {
    /// The store key the file gets when complete.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Queues the next part; waits only when the writing thread is behind.
    pub async fn write(&mut self, part: Bytes) -> std::io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(std::io::Error::other("file already finished"));
        };
        if tx.send(part).await.is_ok() {
            return Ok(());
        }
        // The writing thread stopped: it failed; report its error.
        match self.join().await {
            Err(e) => Err(e),
            Ok(_) => Err(std::io::Error::other("the writing thread ended early")),
        }
    }

    /// Closes the queue and waits for the writing thread (once).
    async fn join(&mut self) -> std::io::Result<File> {
        self.tx = None;
        match self.writer.take() {
            None => Err(std::io::Error::other("the writing thread already ended")),
            Some(writer) => writer.await.map_err(std::io::Error::other)?,
        }
    }

    /// Waits for every part, flushes, renames into place and syncs the folder; returns
    /// the store key.
    pub async fn complete(mut self) -> std::io::Result<String> {
        let file = match self.join().await {
            Ok(file) => file,
            Err(e) => {
                remove_quietly(self.staging.clone()).await;
                return Err(e);
            }
        };
        let fsync = self.files.fsync;
        let (staging, path) = (self.staging.clone(), self.path.clone());
        let placed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if fsync {
                file.sync_data()?;
            }
            drop(file);
            std::fs::rename(&staging, &path)
        })
        .await
        .map_err(std::io::Error::other)?;
        if let Err(e) = placed {
            remove_quietly(self.staging.clone()).await;
            return Err(e);
        }
        if fsync {
            let folder = self.path.parent().expect("keys have folders").to_owned();
            self.files.sync_folder(&folder).await?;
        }
        Ok(self.key.clone())
    }

    /// Discards the staging file.
    pub async fn abort(mut self) {
        let _ = self.join().await;
        remove_quietly(self.staging.clone()).await;
    }
}

async fn remove_quietly(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
}

/// Creates `folder` under `root`; when flushing, syncs each parent that gained an
/// entry, so the new folders survive a power cut with the files in them.
fn create_folders(root: &Path, folder: &Path, fsync: bool) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = folder;
    while !at.is_dir() && at != root {
        missing.push(at.to_owned());
        at = at.parent().unwrap_or(root);
    }
    std::fs::create_dir_all(folder)?;
    if fsync {
        for created in &missing {
            if let Some(parent) = created.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
    }
    Ok(())
}

/// Asks the kernel to start writing a just-written range to disk, without waiting.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor and a range within the file; the call only
    // schedules I/O and reports errors through its return value, which is advisory
    // here (the final fdatasync is what guarantees durability).
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_appear_whole_and_aborts_leave_nothing() {
        let root = std::env::temp_dir().join(format!("radflow-local-{}", std::process::id()));
        let files = LocalFiles::new(root.clone(), true);
        let mut a = files.begin("dicom/1/2/3.dcm").await.unwrap();
        a.write(Bytes::from_static(b"abc")).await.unwrap();
        a.write(Bytes::from_static(b"def")).await.unwrap();
        assert!(!root.join("dicom/1/2/3.dcm").exists());
        assert_eq!(a.complete().await.unwrap(), "dicom/1/2/3.dcm");
        assert_eq!(
            std::fs::read(root.join("dicom/1/2/3.dcm")).unwrap(),
            b"abcdef"
        );

        let mut b = files.begin("dicom/1/2/4.dcm").await.unwrap();
        b.write(Bytes::from_static(b"xyz")).await.unwrap();
        b.abort().await;
        let names: Vec<_> = std::fs::read_dir(root.join("dicom/1/2"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("3.dcm")]);

        // Concurrent completions in one folder share folder syncs and all land.
        let mut tasks = Vec::new();
        for n in 10..30 {
            let files = files.clone();
            tasks.push(tokio::spawn(async move {
                let mut f = files.begin(&format!("dicom/1/2/{n}.dcm")).await.unwrap();
                f.write(Bytes::from(vec![n as u8; 1000])).await.unwrap();
                f.complete().await.unwrap()
            }));
        }
        for t in tasks {
            let key = t.await.unwrap();
            assert_eq!(std::fs::read(root.join(&key)).unwrap().len(), 1000);
        }
        std::fs::remove_dir_all(root).unwrap();
    }
}
