//! Writing received instances straight into a folder store while their PDUs arrive.
//!
//! On a `file://` store the listener does not wait for a whole instance before writing
//! it: each part goes to a staging file beside the final one as soon as it is received,
//! on one blocking thread per instance, so the association keeps reading. When the
//! last fragment arrives, the association tells that thread to finish and waits for it
//! once: the thread makes the file durable and renames it into place.
//!
//! Durable is one of two things. Without the write-ahead journal, the kernel is asked
//! to start writing each part to disk at once (`sync_file_range`), so that at the end
//! only a short `fdatasync` remains, then the rename and a sync of the folder; folder
//! syncs are shared by associations finishing instances in the same series folder at
//! the same time (group commit). With the journal ([`crate::journal`], when turned on),
//! each part also goes into a region of the journal's segment as it arrives, and the
//! end is the rename and a flush of the segment shared with every association that
//! finishes an instance at the same time; the file system flushes many store files
//! together later.
//!
//! The layout is the store's (`dicom/<study>/<series>/<sop>.dcm` under its root) and
//! the staging name is the final name plus `#<digits>`, which `object_store` ignores
//! when it lists a folder, so readers never see a partial file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use radflow_shared::metrics::Metrics;

use crate::journal::{Journal, Record};

/// Parts queued for the writing thread of one file before the association waits.
const QUEUED_PARTS: usize = 8;

/// A folder store written to directly.
#[derive(Debug)]
pub struct LocalFiles {
    root: PathBuf,
    fsync: bool,
    journal: Option<Arc<Journal>>,
    folders: Mutex<HashMap<PathBuf, Arc<FolderSync>>>,
    /// Where flushes are counted (`radflow_listener_store_flushes_total`).
    metrics: Arc<Metrics>,
}

/// Group commit of one folder's `fsync`.
#[derive(Debug, Default)]
struct FolderSync {
    /// Renames into the folder so far (each takes a ticket).
    requested: AtomicU64,
    /// Tickets covered by the last completed sync; held while syncing.
    completed: tokio::sync::Mutex<u64>,
}

/// What the writing thread is told.
enum Message {
    Part(Bytes),
    /// Every part was sent: make the file durable and put it in place.
    Complete,
}

/// How the writing thread left the file.
#[derive(Debug, PartialEq, Eq)]
enum Finished {
    /// In place, and durable (its journal record was committed) or not flushed at all.
    Placed,
    /// In place and flushed; its folder still needs a sync.
    FolderPending,
    /// Aborted: the staging file was removed.
    Aborted,
}

impl LocalFiles {
    /// Writes under `root`; flushes to disk when `fsync`, through `journal` when given;
    /// counts the flushes in `metrics`.
    pub fn new(
        root: PathBuf,
        fsync: bool,
        journal: Option<Arc<Journal>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let journal = journal.filter(|_| fsync);
        if let Some(journal) = &journal {
            journal.report_to(metrics.clone());
        }
        Arc::new(Self {
            root,
            fsync,
            journal,
            folders: Mutex::new(HashMap::new()),
            metrics,
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
        let (tx, rx) = mpsc::channel::<Message>(QUEUED_PARTS);
        let writer = Writer {
            root: self.root.clone(),
            fsync: self.fsync,
            journal: self.journal.clone(),
            metrics: self.metrics.clone(),
            key: key.to_owned(),
            path: path.clone(),
            staging,
        };
        let writer = tokio::task::spawn_blocking(move || writer.run(rx));
        Ok(LocalFile {
            files: self.clone(),
            key: key.to_owned(),
            path,
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
        self.metrics.store_flush("folder");
        *completed = covers;
        Ok(())
    }
}

/// The blocking side of one instance file.
struct Writer {
    root: PathBuf,
    fsync: bool,
    journal: Option<Arc<Journal>>,
    metrics: Arc<Metrics>,
    key: String,
    path: PathBuf,
    staging: PathBuf,
}

impl Writer {
    /// Writes the parts as they come; removes the staging file unless it was placed.
    fn run(self, rx: mpsc::Receiver<Message>) -> std::io::Result<Finished> {
        let result = self.write(rx);
        if !matches!(result, Ok(Finished::Placed | Finished::FolderPending)) {
            let _ = std::fs::remove_file(&self.staging);
        }
        result
    }

    fn write(&self, mut rx: mpsc::Receiver<Message>) -> std::io::Result<Finished> {
        let folder = self.path.parent().expect("keys have folders");
        if !folder.is_dir() {
            let synced = create_folders(&self.root, folder, self.fsync)?;
            for _ in 0..synced {
                self.metrics.store_flush("folder");
            }
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.staging)?;
        let mut record: Option<Record> = match &self.journal {
            Some(journal) => journal.begin()?,
            None => None,
        };
        let mut offset = 0u64;
        loop {
            let part = match rx.blocking_recv() {
                Some(Message::Part(part)) => part,
                Some(Message::Complete) => break,
                None => return Ok(Finished::Aborted),
            };
            file.write_all(&part)?;
            let journaled = match &mut record {
                Some(r) => r.write(&part)?,
                None => false,
            };
            if !journaled {
                if record.take().is_some() && self.fsync {
                    // Outgrew the journal: write back what it held, too.
                    start_writeback(&file, 0, offset);
                }
                if self.fsync {
                    start_writeback(&file, offset, part.len() as u64);
                }
            }
            offset += part.len() as u64;
        }
        if let Some(record) = record {
            drop(file);
            std::fs::rename(&self.staging, &self.path)?;
            record.commit(&self.key)?;
            return Ok(Finished::Placed);
        }
        if self.fsync {
            file.sync_data()?;
            self.metrics.store_flush("file");
        }
        drop(file);
        std::fs::rename(&self.staging, &self.path)?;
        if let Some(journal) = &self.journal {
            // An older journaled version must not come back in a replay.
            journal.settle(&self.key)?;
        }
        Ok(if self.fsync {
            Finished::FolderPending
        } else {
            Finished::Placed
        })
    }
}

/// One instance file being written.
#[derive(Debug)]
pub struct LocalFile {
    files: Arc<LocalFiles>,
    key: String,
    path: PathBuf,
    tx: Option<mpsc::Sender<Message>>,
    /// The writing thread, until it was joined.
    writer: Option<JoinHandle<std::io::Result<Finished>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Part(p) => write!(f, "Part({} bytes)", p.len()),
            Message::Complete => f.write_str("Complete"),
        }
    }
}

impl LocalFile {
    /// The store key the file gets when complete.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Queues the next part; waits only when the writing thread is behind.
    pub async fn write(&mut self, part: Bytes) -> std::io::Result<()> {
        self.send(Message::Part(part)).await
    }

    async fn send(&mut self, message: Message) -> std::io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(std::io::Error::other("file already finished"));
        };
        if tx.send(message).await.is_ok() {
            return Ok(());
        }
        // The writing thread stopped: it failed; report its error.
        match self.join().await {
            Err(e) => Err(e),
            Ok(_) => Err(std::io::Error::other("the writing thread ended early")),
        }
    }

    /// Closes the queue and waits for the writing thread (once).
    async fn join(&mut self) -> std::io::Result<Finished> {
        self.tx = None;
        match self.writer.take() {
            None => Err(std::io::Error::other("the writing thread already ended")),
            Some(writer) => writer.await.map_err(std::io::Error::other)?,
        }
    }

    /// Waits for every part, makes the file durable and puts it in place; returns the
    /// store key.
    pub async fn complete(mut self) -> std::io::Result<String> {
        self.send(Message::Complete).await?;
        match self.join().await? {
            Finished::Placed => {}
            Finished::FolderPending => {
                let folder = self.path.parent().expect("keys have folders").to_owned();
                self.files.sync_folder(&folder).await?;
            }
            Finished::Aborted => return Err(std::io::Error::other("the file was not completed")),
        }
        Ok(self.key.clone())
    }

    /// Discards the staging file.
    pub async fn abort(mut self) {
        let _ = self.join().await;
    }
}

/// Creates `folder` under `root`; when flushing, syncs each parent that gained an
/// entry, so the new folders survive a power cut with the files in them. Returns the
/// number of folders synced.
fn create_folders(root: &Path, folder: &Path, fsync: bool) -> std::io::Result<usize> {
    let mut missing = Vec::new();
    let mut at = folder;
    while !at.is_dir() && at != root {
        missing.push(at.to_owned());
        at = at.parent().unwrap_or(root);
    }
    std::fs::create_dir_all(folder)?;
    let mut synced = 0;
    if fsync {
        for created in &missing {
            if let Some(parent) = created.parent() {
                File::open(parent)?.sync_all()?;
                synced += 1;
            }
        }
    }
    Ok(synced)
}

/// Asks the kernel to start writing a just-written range to disk, without waiting.
#[cfg(target_os = "linux")]
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor and a range within the file; the call only
    // schedules I/O and reports errors through its return value, which is advisory
    // here (the final flush is what guarantees durability).
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
pub(crate) fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Mode {
        Unflushed,
        Flushed,
        Journaled,
    }

    async fn files_appear_whole_and_aborts_leave_nothing(mode: Mode) {
        let root =
            std::env::temp_dir().join(format!("radflow-local-{mode:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let journal = matches!(mode, Mode::Journaled)
            .then(|| crate::journal::Journal::open(&root).unwrap().0);
        let fsync = !matches!(mode, Mode::Unflushed);
        let files = LocalFiles::new(root.clone(), fsync, journal.clone(), Metrics::new());
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

        // Concurrent completions in one folder (sharing folder syncs, or journal
        // slots) all land whole; the largest outgrows a journal record and is flushed
        // directly.
        let mut tasks = Vec::new();
        for n in 10..30usize {
            let files = files.clone();
            tasks.push(tokio::spawn(async move {
                let mut f = files.begin(&format!("dicom/1/2/{n}.dcm")).await.unwrap();
                let size = if n == 10 { 5 << 20 } else { 1000 + n * 70_000 };
                let data = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>());
                for start in (0..size).step_by(256 * 1024) {
                    f.write(data.slice(start..(start + 256 * 1024).min(size)))
                        .await
                        .unwrap();
                }
                (f.complete().await.unwrap(), data)
            }));
        }
        for t in tasks {
            let (key, data) = t.await.unwrap();
            assert_eq!(std::fs::read(root.join(&key)).unwrap(), data);
        }

        // A file whose writing failed reports the error and leaves no staging file.
        std::fs::write(root.join("dicom/1/blocked"), b"").unwrap();
        let mut c = files.begin("dicom/1/blocked/5.dcm").await.unwrap();
        let failed = match c.write(Bytes::from_static(b"abc")).await {
            Err(e) => Err(e),
            Ok(()) => c.complete().await,
        };
        assert!(failed.is_err(), "{failed:?}");
        let left: Vec<_> = std::fs::read_dir(root.join("dicom/1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        if let Some(journal) = journal {
            journal.close();
            // Everything was checkpointed on close: a replay finds nothing to do.
            let replayed = crate::journal::replay_folder(&root, journal.dir()).unwrap();
            assert_eq!(replayed, crate::journal::Replayed::default());
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unflushed_files_appear_whole() {
        files_appear_whole_and_aborts_leave_nothing(Mode::Unflushed).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushed_files_appear_whole() {
        files_appear_whole_and_aborts_leave_nothing(Mode::Flushed).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaled_files_appear_whole() {
        files_appear_whole_and_aborts_leave_nothing(Mode::Journaled).await;
    }
}
