//! A write-ahead journal that makes instances durable with one flush per batch.
//!
//! Flushing a new file costs more than writing its bytes: the file system has to commit
//! the file's blocks, its size and its name to its own journal, and on most disks that
//! is a second and third cache flush per instance (`fdatasync` of the file, `fsync` of
//! its folder). Overwriting bytes a file already has needs none of that. So, on a
//! folder store, each instance is also written into a *region* of one *segment* file,
//! `<store>/.journal/<process>/segment`, which keeps its size from one instance to the
//! next. When the instance is complete, the listener renames the store file into place
//! (without flushing it), writes the region's header (sequence number, store key,
//! length, CRC-32 of the data) and waits for the segment to be flushed; then the
//! instance is durable and the sender hears Success.
//!
//! Flushes are group-committed, as databases do with their log: one flush of the
//! segment covers every record written before it began, so the associations that
//! finish an instance while a flush is in flight wait for the next one together
//! instead of queueing one flush each. The first record to find no flush running
//! starts one at once (no waiting to fill a batch, so a lone association pays one
//! flush per instance and no more); a batch is whatever was written meanwhile, at most
//! [`MAX_SLOTS`] records. When every region is taken, a new instance waits for the
//! checkpoint to give one back (the sender waits with it), and is flushed directly
//! only if none comes back within [`REGION_WAIT`]: memory and disk stay bounded.
//!
//! A background thread checkpoints: it flushes the store's file system once
//! (`syncfs`) for many instances together, records the highest sequence number
//! covered in the journal's `checkpoint` file, and gives those regions back for reuse.
//! After a power cut or a crash, [`Journal::open`] replays every record newer than the
//! checkpoint whose header and data check out (rewriting the store file unless it
//! already holds exactly those bytes) before the listener takes associations again. A
//! record is replayed only if its data CRC matches, so a region torn by the cut (an
//! instance that was never acknowledged) is ignored, and records of one key replay in
//! sequence order, so the newest version wins and nothing is applied twice.
//!
//! Ordering makes the checkpoint sound: a record's sequence number is taken after its
//! store file was renamed into place, and the checkpoint reads the counter before it
//! flushes, so every record at or below the checkpoint has its file on disk.
//!
//! Instances larger than [`MAX_RECORD`] are flushed directly instead. Each process has
//! its own journal folder, locked while it runs; a listener that starts (and every
//! minute after) replays and removes the journals of processes that are gone, its own
//! previous run included, so replicas sharing one store folder recover each other's.
//! Journals of earlier versions, one `slot-*` file per record, are replayed the same
//! way.
//!
//! The segment is opened with `O_DIRECT` where the file system allows it: the data
//! goes from an aligned buffer to the disk without a second copy in the page cache.
//! Regions are taken most recently freed first, so a busy listener keeps reusing the
//! few it has already written (whose flush is then data only). The journal writes
//! every byte twice (segment and store file), so it pays off where a flush of a new
//! file is dear, on file systems that journal their metadata, or where many
//! associations share a flush; it is off unless `--store-journal` turns it on.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use radflow_shared::metrics::Metrics;

/// The journal folder under the store root (not an object key: the store ignores it).
pub const JOURNAL_FOLDER: &str = ".journal";

/// Instances up to this size go through the journal.
pub const MAX_RECORD: u64 = 4 << 20;

/// Regions per process: instances in flight plus those waiting for a checkpoint.
pub const MAX_SLOTS: usize = 64;

/// Longest a new instance waits for a free region before it is flushed directly.
pub const REGION_WAIT: Duration = Duration::from_secs(2);

/// Bytes before a region's data: the record header.
const HEADER: u64 = 4096;
/// Bytes of one region of the segment: header and the largest record.
const REGION: u64 = HEADER + MAX_RECORD;
/// Unit of direct writes (offsets and lengths), a multiple of any disk's sector.
const BLOCK: usize = 4096;
/// Write buffer of a record on a segment opened for direct I/O.
const BUFFER: usize = 256 * 1024;
const SLOT_MAGIC: &[u8; 8] = b"RFJSLOT1";
const CHECKPOINT_MAGIC: &[u8; 8] = b"RFJCKPT1";
const CHECKPOINT_FILE: &str = "checkpoint";
const SEGMENT_FILE: &str = "segment";
const LOCK_FILE: &str = "lock";
/// Held by whoever creates a journal folder or replays others: the two never overlap.
const MANAGE_FILE: &str = "manage.lock";

/// When the checkpoint thread flushes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Once this many records wait for a checkpoint...
    pub records: usize,
    /// ...or the oldest has waited this long (or no region is free, or on close).
    pub age: Duration,
    /// Longest a new instance waits for a free region before it is flushed directly.
    pub region_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            records: 16,
            age: Duration::from_millis(500),
            region_wait: REGION_WAIT,
        }
    }
}
/// Longest [`Journal::settle`] waits for a checkpoint.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the journals of other processes are looked at.
const ORPHAN_SCAN: Duration = Duration::from_secs(60);

/// One process's journal.
#[derive(Debug)]
pub struct Journal {
    root: PathBuf,
    dir: PathBuf,
    /// Held (locked) for the journal's life: the folder is in use.
    _lock: File,
    checkpoint: File,
    /// Every record's region; flushed once per batch.
    segment: File,
    /// The segment was opened for direct I/O: records are written from an aligned
    /// buffer straight to the disk, in whole blocks, without a copy in the page cache.
    direct: bool,
    policy: Policy,
    /// The last sequence number handed out.
    seq: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled after each checkpoint and whenever a region is given back.
    checkpointed: Condvar,
    /// The group commit of segment flushes.
    flush: Mutex<Flushes>,
    /// Signalled after each segment flush.
    flushed: Condvar,
    /// Where flushes and records are counted, once the listener has its metrics.
    metrics: OnceLock<Arc<Metrics>>,
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Segment flushes, numbered: flush `n` covers every record whose writes ended before
/// it began, that is every record that saw `next == n`.
#[derive(Debug)]
struct Flushes {
    /// The number of the next flush to begin.
    next: u64,
    /// The number of the last flush that ended well.
    done: u64,
    /// A flush is in flight (its number is `next - 1`).
    running: bool,
    /// Records waiting for flush `next`: the size of the next batch.
    joined: usize,
    /// The first flush that failed: after a failed `fdatasync` the kernel may have
    /// dropped the pages, so neither it nor any later flush vouches for a record.
    failed: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Regions not in use, the most recently freed last.
    free: Vec<usize>,
    /// Committed records whose files wait for a checkpoint.
    placed: Vec<usize>,
    /// Write buffers not in use (direct segment).
    buffers: Vec<Aligned>,
    oldest_placed: Option<Instant>,
    /// Regions handed out so far (the segment's size in regions).
    created: usize,
    closing: bool,
    /// Store keys of committed records a checkpoint does not cover yet, with the
    /// highest sequence number of each.
    uncovered: HashMap<String, u64>,
    /// A checkpoint is wanted now (see [`Journal::settle`]).
    urgent: bool,
}

/// What [`Journal::open`] found to replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Valid records newer than their journal's checkpoint.
    pub records: usize,
    /// Store files that were missing or different and were rewritten.
    pub rewritten: usize,
    /// Records whose header or data did not check out (never acknowledged).
    pub torn: usize,
}

impl State {
    /// Whether no region is free and no more may be created.
    fn exhausted(&self) -> bool {
        self.free.is_empty() && self.created >= MAX_SLOTS
    }
}

impl Journal {
    /// Replays the journals of processes that are gone, then starts this process's.
    pub fn open(root: &Path) -> io::Result<(Arc<Self>, Replayed)> {
        Self::open_with(root, Policy::default())
    }

    pub(crate) fn open_with(root: &Path, policy: Policy) -> io::Result<(Arc<Self>, Replayed)> {
        let base = root.join(JOURNAL_FOLDER);
        if !base.is_dir() {
            fs::create_dir_all(&base)?;
            File::open(root)?.sync_all()?;
        }
        let replayed = replay_orphans(root, None)?;
        let _managing = manage(&base)?;
        let name = format!(
            "{:x}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let dir = base.join(name);
        fs::create_dir(&dir)?;
        let lock = File::create(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(io::Error::other)?;
        let checkpoint = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(CHECKPOINT_FILE))?;
        checkpoint.write_all_at(&encode_checkpoint(0), 0)?;
        checkpoint.sync_all()?;
        let (segment, direct) = open_segment(&dir.join(SEGMENT_FILE))?;
        File::open(&dir)?.sync_all()?;
        File::open(&base)?.sync_all()?;
        let journal = Arc::new(Self {
            root: root.to_owned(),
            dir,
            _lock: lock,
            checkpoint,
            segment,
            direct,
            policy,
            seq: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            checkpointed: Condvar::new(),
            flush: Mutex::new(Flushes {
                next: 1,
                done: 0,
                running: false,
                joined: 0,
                failed: None,
            }),
            flushed: Condvar::new(),
            metrics: OnceLock::new(),
            checkpointer: Mutex::new(None),
        });
        let worker = journal.clone();
        let handle = std::thread::Builder::new()
            .name("radflow-journal".into())
            .spawn(move || worker.run_checkpoints())?;
        *journal.checkpointer.lock().unwrap() = Some(handle);
        Ok((journal, replayed))
    }

    /// Counts the journal's flushes and records in `metrics` from now on.
    pub fn report_to(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Replays and removes the journals of processes that are gone, without starting
    /// one: a listener whose journal is turned off still restores what an earlier run
    /// with it acknowledged.
    pub fn replay_gone(root: &Path) -> io::Result<Replayed> {
        replay_orphans(root, None)
    }

    /// This process's journal folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a record, or `None` when the instance must be flushed directly: the
    /// journal is closing or broken, or no region came free within [`REGION_WAIT`].
    /// Blocking: waits for the checkpoint while every region is in use.
    pub fn begin(self: &Arc<Self>) -> io::Result<Option<Record>> {
        if self.flush.lock().unwrap().failed.is_some() {
            return Ok(None);
        }
        let deadline = Instant::now() + self.policy.region_wait;
        let mut state = self.state.lock().unwrap();
        loop {
            if state.closing {
                return Ok(None);
            }
            if let Some(region) = state.free.pop() {
                let buffer = state.buffers.pop();
                drop(state);
                return Ok(Some(self.record(region, buffer)));
            }
            if state.created < MAX_SLOTS {
                state.created += 1;
                let region = state.created - 1;
                drop(state);
                return Ok(Some(self.record(region, None)));
            }
            // Every region is in use: push back on the sender until a checkpoint
            // frees one.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.wake.notify_all();
            state = self.checkpointed.wait_timeout(state, left).unwrap().0;
        }
    }

    /// A record in `region`, with `buffer` if the segment is direct (a new one if
    /// `None`).
    fn record(self: &Arc<Self>, region: usize, buffer: Option<Aligned>) -> Record {
        let buffer = self.direct.then(|| buffer.unwrap_or_else(Aligned::new));
        Record {
            journal: self.clone(),
            region: Some(region),
            buffer,
            len: 0,
            pending: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Flushes what is waiting, stops the checkpoint thread and leaves nothing to
    /// replay. Blocking.
    pub fn close(&self) {
        self.state.lock().unwrap().closing = true;
        self.wake.notify_all();
        self.checkpointed.notify_all();
        if let Some(handle) = self.checkpointer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }

    /// Returns once no record older than now holds `key`, checkpointing if one does:
    /// an instance flushed directly (not journaled) calls this before it is
    /// acknowledged, so that a replay cannot put an older version of it back.
    pub fn settle(&self, key: &str) -> io::Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut state = self.state.lock().unwrap();
        while state.uncovered.contains_key(key) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the journal could not checkpoint an older version of this instance",
                ));
            }
            state.urgent = true;
            self.wake.notify_all();
            state = self.checkpointed.wait_timeout(state, left).unwrap().0;
        }
        Ok(())
    }

    /// Returns once a flush of the segment that began after this call has ended: every
    /// write to the segment finished before the call is then durable. One flush runs at
    /// a time; the callers that arrive while it runs share the next one.
    fn flush_segment(&self) -> io::Result<()> {
        let mut flushes = self.flush.lock().unwrap();
        let mine = flushes.next;
        flushes.joined += 1;
        loop {
            if flushes.failed.is_some_and(|failed| mine >= failed) {
                return Err(io::Error::other(
                    "the journal segment could not be flushed earlier; the journal is off until restart",
                ));
            }
            if flushes.done >= mine {
                return Ok(());
            }
            if flushes.running {
                flushes = self.flushed.wait(flushes).unwrap();
                continue;
            }
            flushes.running = true;
            let number = flushes.next;
            flushes.next += 1;
            let batch = std::mem::take(&mut flushes.joined);
            drop(flushes);
            tracing::trace!(batch, "flushing the journal segment");
            let result = self.segment.sync_data();
            if let Some(metrics) = self.metrics.get() {
                metrics.store_flush("journal");
            }
            flushes = self.flush.lock().unwrap();
            flushes.running = false;
            match result {
                Ok(()) => flushes.done = number,
                Err(e) => {
                    tracing::error!(error = %e, dir = %self.dir.display(), "journal segment flush failed; instances are flushed directly from now on");
                    flushes.failed.get_or_insert(number);
                }
            }
            self.flushed.notify_all();
        }
    }

    fn placed(&self, region: usize, buffer: Option<Aligned>, key: &str, seq: u64) {
        let mut state = self.state.lock().unwrap();
        let newest = state.uncovered.entry(key.to_owned()).or_default();
        *newest = (*newest).max(seq);
        state.buffers.extend(buffer);
        state.placed.push(region);
        state.oldest_placed.get_or_insert_with(Instant::now);
        if state.placed.len() >= self.policy.records || state.exhausted() {
            self.wake.notify_all();
        }
    }

    fn give_back(&self, region: usize, buffer: Option<Aligned>) {
        let mut state = self.state.lock().unwrap();
        state.buffers.extend(buffer);
        state.free.push(region);
        self.checkpointed.notify_all();
    }

    fn run_checkpoints(self: Arc<Self>) {
        let mut scanned = Instant::now();
        loop {
            let (batch, upto) = {
                let mut state = self.state.lock().unwrap();
                loop {
                    let waiting = !state.placed.is_empty();
                    if !waiting && state.closing {
                        return;
                    }
                    let age = state.oldest_placed.map(|t| t.elapsed());
                    let due = waiting
                        && (state.closing
                            || state.urgent
                            || state.placed.len() >= self.policy.records
                            || state.exhausted()
                            || age.is_some_and(|a| a >= self.policy.age));
                    if due {
                        break;
                    }
                    if !waiting && scanned.elapsed() >= ORPHAN_SCAN {
                        break;
                    }
                    let wait = match age {
                        Some(age) => self.policy.age.saturating_sub(age),
                        None => ORPHAN_SCAN.saturating_sub(scanned.elapsed()),
                    };
                    state = self
                        .wake
                        .wait_timeout(state, wait.max(Duration::from_millis(1)))
                        .unwrap()
                        .0;
                }
                state.oldest_placed = None;
                state.urgent = false;
                (
                    std::mem::take(&mut state.placed),
                    self.seq.load(Ordering::SeqCst),
                )
            };
            if !batch.is_empty() {
                match self.checkpoint_to(upto) {
                    Ok(()) => {
                        let mut state = self.state.lock().unwrap();
                        state.free.extend(batch);
                        state.uncovered.retain(|_, seq| *seq > upto);
                        self.checkpointed.notify_all();
                    }
                    Err(e) => {
                        let closing = {
                            let mut state = self.state.lock().unwrap();
                            state.placed.extend(batch);
                            state.oldest_placed.get_or_insert_with(Instant::now);
                            state.closing
                        };
                        if closing {
                            // The records stay in the journal and are replayed at start.
                            tracing::warn!(error = %e, dir = %self.dir.display(), "journal checkpoint failed at shutdown; the next start replays it");
                            return;
                        }
                        tracing::warn!(error = %e, dir = %self.dir.display(), "journal checkpoint failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            if scanned.elapsed() >= ORPHAN_SCAN {
                scanned = Instant::now();
                match replay_orphans(&self.root, Some(&self.dir)) {
                    Ok(r) if r.records > 0 => {
                        tracing::info!(
                            records = r.records,
                            rewritten = r.rewritten,
                            "replayed the journal of a listener that is gone"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot replay other journals"),
                }
            }
        }
    }

    /// Makes every store file renamed before record `upto` durable, then records it.
    fn checkpoint_to(&self, upto: u64) -> io::Result<()> {
        sync_file_system(&File::open(&self.root)?)?;
        self.checkpoint.write_all_at(&encode_checkpoint(upto), 0)?;
        let flushed = self.checkpoint.sync_data();
        if let Some(metrics) = self.metrics.get() {
            metrics.store_flush("checkpoint");
        }
        flushed
    }
}

/// Opens (creates) the segment, for direct I/O where the file system allows it.
fn open_segment(path: &Path) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = options.clone();
        direct.custom_flags(libc::O_DIRECT);
        match direct.open(path) {
            Ok(file) => return Ok((file, true)),
            // The file system does not do direct I/O (tmpfs, some overlays).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((options.open(path)?, false))
}

/// [`BUFFER`] bytes aligned to [`BLOCK`], as direct I/O requires.
#[derive(Debug)]
struct Aligned {
    memory: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let memory = vec![0u8; BUFFER + BLOCK];
        let start = memory.as_ptr().align_offset(BLOCK);
        Self { memory, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.memory[self.start..self.start + BUFFER]
    }
}

/// One instance on its way into a region of the segment.
#[derive(Debug)]
pub struct Record {
    journal: Arc<Journal>,
    region: Option<usize>,
    /// The write buffer of a direct segment.
    buffer: Option<Aligned>,
    /// Data bytes received.
    len: u64,
    /// Of those, bytes still in the buffer (less than a block between writes).
    pending: usize,
    crc: crc32fast::Hasher,
}

impl Record {
    /// Appends `part`. `Ok(false)` when the instance outgrew the journal: the region is
    /// given back and the instance must be flushed directly.
    pub fn write(&mut self, part: &[u8]) -> io::Result<bool> {
        let Some(region) = self.region else {
            return Ok(false);
        };
        if self.len + part.len() as u64 > MAX_RECORD {
            self.abandon();
            return Ok(false);
        }
        let segment = &self.journal.segment;
        let data = region as u64 * REGION + HEADER;
        self.crc.update(part);
        let Some(buffer) = &mut self.buffer else {
            segment.write_all_at(part, data + self.len)?;
            crate::local::start_writeback(segment, data + self.len, part.len() as u64);
            self.len += part.len() as u64;
            return Ok(true);
        };
        let mut rest = part;
        while !rest.is_empty() {
            let take = (BUFFER - self.pending).min(rest.len());
            buffer.bytes()[self.pending..self.pending + take].copy_from_slice(&rest[..take]);
            self.pending += take;
            self.len += take as u64;
            rest = &rest[take..];
            // Whole blocks go to the disk now, so it works while the network delivers.
            if self.pending == BUFFER || rest.is_empty() {
                let whole = self.pending / BLOCK * BLOCK;
                if whole > 0 {
                    let at = data + self.len - self.pending as u64;
                    segment.write_all_at(&buffer.bytes()[..whole], at)?;
                    buffer.bytes().copy_within(whole..self.pending, 0);
                    self.pending -= whole;
                }
            }
        }
        Ok(true)
    }

    /// Whether the record still holds a region.
    pub fn active(&self) -> bool {
        self.region.is_some()
    }

    /// Commits the record for store key `key`, whose file must already be in place:
    /// writes the rest of the data and the header, and waits for a flush of the
    /// segment that covers them (shared with every record committed meanwhile).
    /// Afterwards the instance is durable.
    pub fn commit(mut self, key: &str) -> io::Result<()> {
        let region = self
            .region
            .take()
            .ok_or_else(|| io::Error::other("journal record already given back"))?;
        let segment = &self.journal.segment;
        let start = region as u64 * REGION;
        let mut buffer = self.buffer.take();
        let seq = self.journal.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let header = encode_header(seq, key, self.len, self.crc.clone().finalize());
        let written = match &mut buffer {
            None => segment.write_all_at(&header, start),
            Some(buffer) => {
                let bytes = buffer.bytes();
                let tail = self.pending.div_ceil(BLOCK) * BLOCK;
                bytes[self.pending..tail].fill(0);
                let at = start + HEADER + self.len - self.pending as u64;
                let data = if tail > 0 {
                    segment.write_all_at(&bytes[..tail], at)
                } else {
                    Ok(())
                };
                data.and_then(|()| {
                    bytes[..BLOCK].fill(0);
                    bytes[..header.len()].copy_from_slice(&header);
                    segment.write_all_at(&bytes[..BLOCK], start)
                })
            }
        };
        // Even on failure the header may be on disk: the region waits for a checkpoint.
        let result = written.and_then(|()| self.journal.flush_segment());
        if let Some(metrics) = self.journal.metrics.get() {
            metrics.journal_records.inc();
        }
        self.journal.placed(region, buffer, key, seq);
        result
    }

    /// Gives the region back unused (an aborted instance).
    pub fn abandon(&mut self) {
        if let Some(region) = self.region.take() {
            self.journal.give_back(region, self.buffer.take());
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.abandon();
    }
}

fn encode_checkpoint(seq: u64) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..8].copy_from_slice(CHECKPOINT_MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_checkpoint(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < 20 || &bytes[..8] != CHECKPOINT_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    (crc32fast::hash(&bytes[..16]) == crc)
        .then(|| u64::from_le_bytes(bytes[8..16].try_into().unwrap()))
}

/// Header: magic, sequence, data length, data CRC, key length (u16), key, header CRC.
fn encode_header(seq: u64, key: &str, len: u64, crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(34 + key.len());
    out.extend_from_slice(SLOT_MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert!(out.len() as u64 <= HEADER);
    out
}

#[derive(Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    len: u64,
    crc: u32,
    key: String,
}

fn decode_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < 34 || &bytes[..8] != SLOT_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let len = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    let crc = u32::from_le_bytes(bytes[24..28].try_into().ok()?);
    let key_len = u16::from_le_bytes(bytes[28..30].try_into().ok()?) as usize;
    let end = 30 + key_len;
    if end + 4 > bytes.len() {
        return None;
    }
    let header_crc = u32::from_le_bytes(bytes[end..end + 4].try_into().ok()?);
    if crc32fast::hash(&bytes[..end]) != header_crc || len > MAX_RECORD {
        return None;
    }
    let key = std::str::from_utf8(&bytes[30..end]).ok()?.to_owned();
    Some(Header { seq, len, crc, key })
}

/// Whether a key read back from a journal may be written under the store root: an
/// instance key, relative, without `..` or staging suffixes.
fn is_instance_key(key: &str) -> bool {
    key.starts_with("dicom/")
        && key.ends_with(".dcm")
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(['#', '\\', '\0']))
}

/// Waits for and takes the lock that serialises creating and replaying journal folders.
fn manage(base: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(base.join(MANAGE_FILE))?;
    file.lock()?;
    Ok(file)
}

/// Replays and removes every journal folder under `root` that no running process
/// holds, except `own`.
fn replay_orphans(root: &Path, own: Option<&Path>) -> io::Result<Replayed> {
    let base = root.join(JOURNAL_FOLDER);
    let mut total = Replayed::default();
    if !base.is_dir() {
        return Ok(total);
    }
    // A folder being created has no lock file yet; creation holds this lock.
    let _managing = manage(&base)?;
    let entries = fs::read_dir(&base)?;
    for entry in entries {
        let dir = entry?.path();
        if Some(dir.as_path()) == own || !dir.is_dir() {
            continue;
        }
        let lock = match File::open(dir.join(LOCK_FILE)) {
            Ok(lock) => lock,
            // A folder without its lock file never held a record.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::remove_dir_all(&dir);
                continue;
            }
            Err(e) => return Err(e),
        };
        if lock.try_lock().is_err() {
            continue; // a running listener's journal
        }
        if !dir.is_dir() {
            continue; // removed by another process meanwhile
        }
        let r = replay_folder(root, &dir)?;
        total.records += r.records;
        total.rewritten += r.rewritten;
        total.torn += r.torn;
        fs::remove_dir_all(&dir)?;
    }
    File::open(&base)?.sync_all()?;
    Ok(total)
}

/// Replays one journal folder's records newer than its checkpoint (of each key the
/// newest complete one) and makes them durable.
pub(crate) fn replay_folder(root: &Path, dir: &Path) -> io::Result<Replayed> {
    let checkpoint = match fs::read(dir.join(CHECKPOINT_FILE)) {
        Ok(bytes) => decode_checkpoint(&bytes).unwrap_or(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    // (header, file, offset of the record's header): the regions of the segment and
    // the slot files of journals written before there was a segment.
    let mut records: Vec<(Header, usize, u64)> = Vec::new();
    let mut files = Vec::new();
    let mut replayed = Replayed::default();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let (is_segment, is_slot) = (name == SEGMENT_FILE, name.starts_with("slot-"));
        if !is_segment && !is_slot {
            continue;
        }
        let file = File::open(&path)?;
        let regions = if is_segment {
            file.metadata()?.len().div_ceil(REGION)
        } else {
            1
        };
        let index = files.len();
        let mut head = vec![0u8; HEADER as usize];
        for region in 0..regions {
            let at = region * REGION;
            let n = read_at_most(&file, &mut head, at)?;
            match decode_header(&head[..n]) {
                Some(h) if h.seq > checkpoint => records.push((h, index, at)),
                Some(_) => {}
                None if head[..n].starts_with(SLOT_MAGIC) => replayed.torn += 1,
                None => {}
            }
        }
        files.push(file);
    }
    // Newest first: the newest complete record of a key is the one that counts, and
    // the older ones it supersedes are not written at all (nothing is applied twice).
    records.sort_by_key(|(h, _, _)| std::cmp::Reverse(h.seq));
    let mut applied = std::collections::HashSet::new();
    for (header, file, at) in records {
        if applied.contains(&header.key) {
            replayed.records += 1;
            continue;
        }
        let mut data = vec![0u8; header.len as usize];
        let n = read_at_most(&files[file], &mut data, at + HEADER)?;
        if n as u64 != header.len
            || crc32fast::hash(&data) != header.crc
            || !is_instance_key(&header.key)
        {
            replayed.torn += 1;
            continue;
        }
        replayed.records += 1;
        applied.insert(header.key.clone());
        let target = root.join(&header.key);
        if fs::read(&target).is_ok_and(|have| have == data) {
            File::open(&target)?.sync_all()?;
            continue;
        }
        let folder = target.parent().expect("instance keys have folders");
        fs::create_dir_all(folder)?;
        let mut staging = target.clone().into_os_string();
        staging.push("#replay");
        let staging = PathBuf::from(staging);
        let file = File::create(&staging)?;
        file.write_all_at(&data, 0)?;
        file.sync_all()?;
        fs::rename(&staging, &target)?;
        replayed.rewritten += 1;
    }
    if replayed.records > 0 {
        sync_file_system(&File::open(root)?)?;
    }
    Ok(replayed)
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Flushes the whole file system that holds `file` (data and metadata), once.
#[cfg(target_os = "linux")]
fn sync_file_system(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; syncfs only flushes and reports an error code.
    if unsafe { libc::syncfs(file.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_file_system(_file: &File) -> io::Result<()> {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("radflow-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        root
    }

    fn write_slot(dir: &Path, n: usize, seq: u64, key: &str, data: &[u8], crc: u32) {
        let slot = File::create(dir.join(format!("slot-{n:05}"))).unwrap();
        slot.write_all_at(&encode_header(seq, key, data.len() as u64, crc), 0)
            .unwrap();
        slot.write_all_at(data, HEADER).unwrap();
    }

    fn no_hold(age_secs: u64) -> Policy {
        Policy {
            records: usize::MAX,
            age: Duration::from_secs(age_secs),
            region_wait: Duration::from_secs(3600),
        }
    }

    /// Writes a record into region `region` of a segment file.
    fn write_region(segment: &File, region: u64, seq: u64, key: &str, data: &[u8], crc: u32) {
        let at = region * REGION;
        segment
            .write_all_at(&encode_header(seq, key, data.len() as u64, crc), at)
            .unwrap();
        segment.write_all_at(data, at + HEADER).unwrap();
    }

    /// Commits `data` under `key` (its store file written first, as the listener does).
    fn commit(root: &Path, journal: &Arc<Journal>, key: &str, data: &[u8]) {
        let mut record = journal.begin().unwrap().expect("a free region");
        assert!(record.write(data).unwrap());
        let path = root.join(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
        record.commit(key).unwrap();
    }

    fn flushes(metrics: &Metrics, kind: &str) -> u64 {
        let line = format!("radflow_listener_store_flushes_total{{kind=\"{kind}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    #[test]
    fn records_committed_while_a_flush_runs_share_the_next_one() {
        let root = temp_root("group");
        let (journal, _) = Journal::open_with(&root, no_hold(3600)).unwrap();
        let metrics = Metrics::new();
        journal.report_to(metrics.clone());
        // A lone record: one flush of its own.
        commit(&root, &journal, "dicom/1/2/first.dcm", b"first");
        assert_eq!(flushes(&metrics, "journal"), 1);

        // Twelve records committed while a flush is in flight wait for the next one
        // together.
        journal.flush.lock().unwrap().running = true;
        let committers: Vec<_> = (0..12usize)
            .map(|i| {
                let (root, journal) = (root.clone(), journal.clone());
                std::thread::spawn(move || {
                    let data: Vec<u8> = (0..50_000 + i).map(|b| (b * 13 + i) as u8).collect();
                    let key = format!("dicom/1/2/{i}.dcm");
                    commit(&root, &journal, &key, &data);
                    (key, data)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while journal.flush.lock().unwrap().joined < 12 {
            assert!(Instant::now() < deadline, "the committers did not arrive");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(flushes(&metrics, "journal"), 1, "nobody answered early");
        {
            let mut flush = journal.flush.lock().unwrap();
            flush.running = false;
            journal.flushed.notify_all();
        }
        let sent: Vec<_> = committers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(flushes(&metrics, "journal"), 2, "one flush for the batch");
        assert_eq!(metrics.journal_records.get(), 13);

        // A crash now: the segment holds all thirteen, the store lost its files.
        let image = root.join("crash-image");
        fs::create_dir_all(&image).unwrap();
        fs::copy(journal.dir().join(SEGMENT_FILE), image.join(SEGMENT_FILE)).unwrap();
        fs::copy(
            journal.dir().join(CHECKPOINT_FILE),
            image.join(CHECKPOINT_FILE),
        )
        .unwrap();
        fs::remove_dir_all(root.join("dicom")).unwrap();
        let replayed = replay_folder(&root, &image).unwrap();
        assert_eq!(
            (replayed.records, replayed.rewritten, replayed.torn),
            (13, 13, 0)
        );
        for (key, data) in &sent {
            assert!(fs::read(root.join(key)).unwrap() == *data, "{key}");
        }
        assert_eq!(
            fs::read(root.join("dicom/1/2/first.dcm")).unwrap(),
            b"first"
        );
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_segment_replays_complete_records_once_newest_first_and_skips_torn_ones() {
        let root = temp_root("segment");
        let orphan = root.join(JOURNAL_FOLDER).join("gone");
        fs::create_dir_all(&orphan).unwrap();
        File::create(orphan.join(LOCK_FILE)).unwrap();
        fs::write(orphan.join(CHECKPOINT_FILE), encode_checkpoint(1)).unwrap();
        let segment = File::create(orphan.join(SEGMENT_FILE)).unwrap();
        let h = crc32fast::hash;
        // Covered by the checkpoint (a region about to be reused): left alone.
        write_region(&segment, 0, 1, "dicom/1/2/old.dcm", b"old", h(b"old"));
        // A newer version of a.dcm in a later region than the older one.
        write_region(&segment, 3, 2, "dicom/1/2/a.dcm", b"a-v1", h(b"a-v1"));
        write_region(&segment, 1, 6, "dicom/1/2/a.dcm", b"a-v2", h(b"a-v2"));
        write_region(&segment, 2, 3, "dicom/1/2/b.dcm", b"bbbb", h(b"bbbb"));
        // Torn by a cut before its flush: the header made it, the data did not.
        write_region(&segment, 4, 4, "dicom/1/2/c.dcm", b"cc", h(b"cccc"));
        // A header torn itself, in the last region (the file ends inside it).
        let mut broken = encode_header(5, "dicom/1/2/d.dcm", 1, h(b"d"));
        broken[9] ^= 1;
        segment.write_all_at(&broken, 5 * REGION).unwrap();
        drop(segment);
        let image = root.join("copy");
        fs::create_dir_all(&image).unwrap();
        for name in [SEGMENT_FILE, CHECKPOINT_FILE] {
            fs::copy(orphan.join(name), image.join(name)).unwrap();
        }

        let (journal, replayed) = Journal::open(&root).unwrap();
        assert_eq!(
            replayed,
            Replayed {
                records: 3,
                rewritten: 2,
                torn: 2
            }
        );
        assert_eq!(fs::read(root.join("dicom/1/2/a.dcm")).unwrap(), b"a-v2");
        assert_eq!(fs::read(root.join("dicom/1/2/b.dcm")).unwrap(), b"bbbb");
        assert!(!root.join("dicom/1/2/old.dcm").exists());
        assert!(!root.join("dicom/1/2/c.dcm").exists());
        assert!(!orphan.exists(), "a replayed journal is removed");
        // Replaying the same records again (a crash during replay) changes nothing:
        // no file is rewritten, none is doubled.
        let again = replay_folder(&root, &image).unwrap();
        assert_eq!((again.records, again.rewritten), (3, 0));
        let mut names: Vec<_> = fs::read_dir(root.join("dicom/1/2"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.dcm", "b.dcm"]);
        assert_eq!(fs::read(root.join("dicom/1/2/a.dcm")).unwrap(), b"a-v2");
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn with_every_region_taken_a_new_instance_waits_for_one() {
        let root = temp_root("full");
        let (journal, _) = Journal::open_with(&root, no_hold(3600)).unwrap();
        let held: Vec<_> = (0..MAX_SLOTS)
            .map(|_| journal.begin().unwrap().expect("a region"))
            .collect();
        let waiter = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.begin().unwrap().and_then(|r| r.region))
        };
        // The waiter holds no region and takes none while all are in use.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "it must wait, not bypass the journal"
        );
        drop(held);
        let region = waiter.join().unwrap();
        assert!(region.is_some_and(|r| r < MAX_SLOTS), "{region:?}");
        assert_eq!(journal.state.lock().unwrap().created, MAX_SLOTS);
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_gone_listeners_journal_is_replayed_from_its_checkpoint() {
        let root = temp_root("replay");
        let orphan = root.join(JOURNAL_FOLDER).join("gone");
        fs::create_dir_all(&orphan).unwrap();
        File::create(orphan.join(LOCK_FILE)).unwrap();
        fs::write(orphan.join(CHECKPOINT_FILE), encode_checkpoint(1)).unwrap();
        let h = crc32fast::hash;
        // Covered by the checkpoint: its file was removed since and stays removed.
        write_slot(&orphan, 0, 1, "dicom/1/2/old.dcm", b"old", h(b"old"));
        // Missing from the store: rewritten.
        write_slot(&orphan, 1, 2, "dicom/1/2/a.dcm", b"aaaa", h(b"aaaa"));
        // Already in the store with these bytes: kept as it is.
        fs::create_dir_all(root.join("dicom/1/2")).unwrap();
        fs::write(root.join("dicom/1/2/b.dcm"), b"bbbb").unwrap();
        write_slot(&orphan, 2, 3, "dicom/1/2/b.dcm", b"bbbb", h(b"bbbb"));
        // A newer version of a.dcm, in a slot listed earlier: sequence order wins.
        write_slot(&orphan, 9, 5, "dicom/1/2/a.dcm", b"a-v2", h(b"a-v2"));
        // Torn data (never acknowledged), a key outside the store, a torn header.
        write_slot(&orphan, 4, 4, "dicom/1/2/c.dcm", b"cccc", h(b"cccx"));
        write_slot(&orphan, 5, 6, "../escape.dcm", b"x", h(b"x"));
        let mut broken = encode_header(7, "dicom/1/2/d.dcm", 1, h(b"d"));
        broken[12] ^= 1;
        fs::write(orphan.join("slot-00006"), broken).unwrap();

        let (journal, replayed) = Journal::open(&root).unwrap();
        assert_eq!(
            replayed,
            Replayed {
                records: 3,
                rewritten: 1,
                torn: 3
            }
        );
        assert_eq!(fs::read(root.join("dicom/1/2/a.dcm")).unwrap(), b"a-v2");
        assert_eq!(fs::read(root.join("dicom/1/2/b.dcm")).unwrap(), b"bbbb");
        let mut names: Vec<_> = fs::read_dir(root.join("dicom/1/2"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.dcm", "b.dcm"]);
        assert!(!root.parent().unwrap().join("escape.dcm").exists());
        assert!(!orphan.exists(), "a replayed journal is removed");
        assert!(journal.dir().starts_with(root.join(JOURNAL_FOLDER)));
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn committed_records_replay_until_a_checkpoint_covers_them() {
        let root = temp_root("live");
        let (journal, _) = Journal::open_with(&root, no_hold(3600)).unwrap();
        let mut sent = Vec::new();
        for i in 0..5usize {
            let key = format!("dicom/1/2/{i}.dcm");
            let data: Vec<u8> = (0..100_000 + i).map(|b| (b * 7 + i) as u8).collect();
            let mut record = journal.begin().unwrap().unwrap();
            for chunk in data.chunks(30_000) {
                assert!(record.write(chunk).unwrap());
            }
            fs::create_dir_all(root.join("dicom/1/2")).unwrap();
            fs::write(root.join(&key), &data).unwrap();
            record.commit(&key).unwrap();
            sent.push((key, data));
        }
        // An aborted instance gives its region back and leaves no record.
        let mut aborted = journal.begin().unwrap().unwrap();
        aborted.write(b"partial").unwrap();
        drop(aborted);

        // A crash now: the journal holds what was flushed, the store lost its files.
        let image = root.join("crash-image");
        fs::create_dir_all(&image).unwrap();
        for entry in fs::read_dir(journal.dir()).unwrap() {
            let path = entry.unwrap().path();
            fs::copy(&path, image.join(path.file_name().unwrap())).unwrap();
        }
        fs::remove_dir_all(root.join("dicom")).unwrap();
        let replayed = replay_folder(&root, &image).unwrap();
        assert_eq!(
            (replayed.records, replayed.rewritten, replayed.torn),
            (5, 5, 0)
        );
        for (key, data) in &sent {
            assert_eq!(&fs::read(root.join(key)).unwrap(), data, "{key}");
        }

        // Closing checkpoints: nothing is left to replay, and no region is handed out.
        journal.close();
        assert_eq!(
            replay_folder(&root, journal.dir()).unwrap(),
            Replayed::default()
        );
        assert!(journal.begin().unwrap().is_none());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn checkpoints_free_regions_and_large_instances_bypass_the_journal() {
        let root = temp_root("slots");
        let (journal, _) = Journal::open_with(
            &root,
            Policy {
                records: 1,
                age: Duration::from_millis(1),
                region_wait: Duration::from_secs(3600),
            },
        )
        .unwrap();
        fs::create_dir_all(root.join("dicom/1/2")).unwrap();
        // Sequential instances reuse the one region once each is checkpointed.
        for i in 0..20 {
            let key = format!("dicom/1/2/{i}.dcm");
            let mut record = journal.begin().unwrap().unwrap();
            record.write(&[i as u8; 5000]).unwrap();
            fs::write(root.join(&key), [i as u8; 5000]).unwrap();
            record.commit(&key).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while journal.state.lock().unwrap().free.is_empty() {
                assert!(Instant::now() < deadline, "no checkpoint");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(journal.state.lock().unwrap().created, 1);
        let checkpoint = decode_checkpoint(&fs::read(journal.dir().join(CHECKPOINT_FILE)).unwrap());
        assert_eq!(checkpoint, Some(20));

        let mut big = journal.begin().unwrap().unwrap();
        let chunk = vec![1u8; 1 << 20];
        let mut written = 0;
        while big.write(&chunk).unwrap() {
            written += chunk.len() as u64;
        }
        assert_eq!(written, MAX_RECORD);
        assert!(!big.active());
        assert_eq!(journal.state.lock().unwrap().free.len(), 1);
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn settling_a_key_checkpoints_its_older_record() {
        let root = temp_root("settle");
        let (journal, _) = Journal::open_with(&root, no_hold(3600)).unwrap();
        let checkpoint =
            || decode_checkpoint(&fs::read(journal.dir().join(CHECKPOINT_FILE)).unwrap()).unwrap();
        // A key without a journaled record settles at once, without a checkpoint.
        journal.settle("dicom/1/2/none.dcm").unwrap();
        assert_eq!(checkpoint(), 0);
        let mut record = journal.begin().unwrap().unwrap();
        record.write(b"old").unwrap();
        fs::create_dir_all(root.join("dicom/1/2")).unwrap();
        fs::write(root.join("dicom/1/2/x.dcm"), b"old").unwrap();
        record.commit("dicom/1/2/x.dcm").unwrap();
        // A newer version written directly: once settled, a replay leaves it alone.
        fs::write(root.join("dicom/1/2/x.dcm"), b"newer, flushed directly").unwrap();
        journal.settle("dicom/1/2/x.dcm").unwrap();
        assert_eq!(checkpoint(), 1);
        assert_eq!(
            replay_folder(&root, journal.dir()).unwrap(),
            Replayed::default()
        );
        assert_eq!(
            fs::read(root.join("dicom/1/2/x.dcm")).unwrap(),
            b"newer, flushed directly"
        );
        journal.close();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_journal_is_replayed_even_when_the_next_run_has_none() {
        let root = temp_root("off");
        let gone = root.join(JOURNAL_FOLDER).join("gone");
        fs::create_dir_all(&gone).unwrap();
        File::create(gone.join(LOCK_FILE)).unwrap();
        let data = b"acknowledged";
        write_slot(&gone, 0, 1, "dicom/1/2/x.dcm", data, crc32fast::hash(data));
        let replayed = Journal::replay_gone(&root).unwrap();
        assert_eq!((replayed.records, replayed.rewritten), (1, 1));
        assert_eq!(fs::read(root.join("dicom/1/2/x.dcm")).unwrap(), data);
        assert!(!gone.exists());
        assert_eq!(Journal::replay_gone(&root).unwrap(), Replayed::default());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_running_listeners_journal_is_left_alone() {
        let root = temp_root("two");
        let (first, _) = Journal::open_with(&root, no_hold(3600)).unwrap();
        let mut record = first.begin().unwrap().unwrap();
        record.write(b"abc").unwrap();
        fs::create_dir_all(root.join("dicom/1/2")).unwrap();
        fs::write(root.join("dicom/1/2/x.dcm"), b"abc").unwrap();
        record.commit("dicom/1/2/x.dcm").unwrap();
        let (second, replayed) = Journal::open(&root).unwrap();
        assert_eq!(replayed, Replayed::default());
        assert!(first.dir().is_dir());
        assert_ne!(first.dir(), second.dir());
        second.close();
        first.close();
        fs::remove_dir_all(root).unwrap();
    }
}
