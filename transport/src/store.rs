//! The destination's on-disk, content-addressed chunk store, kept across transfers.
//!
//! Every chunk ever received is kept here under its id, so a later transfer only asks for the
//! chunks the store lacks. Chunks are stored in their encoded form (what came over the wire), so
//! storing costs no compression and disk bandwidth is saved; reading decodes and re-verifies the
//! blake3 id, so disk corruption is caught: a corrupt file is deleted and the chunk reported as
//! missing, to be fetched again.
//!
//! Layout: `ROOT/chunks/<first 2 hex>/<64 hex>` for chunks, `ROOT/tmp/` for files being
//! written. Directories are 0700 and files 0600, set explicitly whatever the umask. A chunk file
//! is a 9-byte header (magic `CKS1`, the [`Encoding`] byte, the raw length as little-endian
//! `u32`) followed by the payload.
//!
//! Crash safety: a chunk reaches its final name only as temp file (O_EXCL), `fdatasync`, rename,
//! so a final name only ever holds a complete chunk. The fsync is taken off the transfer's
//! critical path: [`DiskStore::put`] writes the temp file and indexes the chunk at once
//! (readable from the temp file), and [`DiskStore::commit_some`], run by the caller on as many
//! threads as the disk likes, does the fdatasync and rename. [`DiskStore::sync`] commits what
//! is left, then fsyncs the directories; a chunk not committed when the process dies is simply
//! gone (its temp file is removed by the next [`DiskStore::open`], with any stray names) and is
//! fetched again by the next transfer that needs it.
//!
//! Size cap: an in-memory index (id → size on disk, last use) is built at open from the files,
//! ordered by mtime. Use updates the mtime too, so least-recently-used order survives a restart.
//! Nothing is evicted during `put`; [`DiskStore::evict_to_cap`] deletes least-recently-used
//! chunks, sparing those the caller still needs, until the store fits its cap. One
//! [`DiskStore`] per root at a time: a second one opening the same root would delete the first
//! one's temp files.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::codec::{decode_verified, Encoded, Encoding};
use crate::{ChunkId, MAX_CHUNK_LEN};

/// First bytes of every chunk file.
const MAGIC: [u8; 4] = *b"CKS1";
/// Magic, encoding byte, raw length.
const HEADER_LEN: usize = 9;
/// Largest valid chunk file: a payload is never longer than its raw chunk.
const MAX_FILE_LEN: u64 = HEADER_LEN as u64 + MAX_CHUNK_LEN as u64;
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// Step between the mtimes the store sets, so use order is strict even within a clock tick.
const MTIME_STEP: Duration = Duration::from_micros(1);
/// Attempts at a fresh temp file name before giving up.
const TEMP_ATTEMPTS: u32 = 16;

/// A failed chunk store operation; each names the path and the operation.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The file system holding the store is out of space (or of quota).
    #[error(
        "the disk holding the chunk store is full (while writing {path}): free space on it or \
         lower the store's size cap"
    )]
    NoSpace {
        /// The file or directory being written.
        path: PathBuf,
    },
    /// The store root exists but is not a directory.
    #[error("chunk store root {path} exists but is not a directory: point the store elsewhere")]
    NotADirectory {
        /// The root given to [`DiskStore::open`].
        path: PathBuf,
    },
    /// Creating a store directory or setting its permissions failed.
    #[error(
        "preparing chunk store directory {path}: {source}; check that its parent is writable \
         by this user"
    )]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Listing, checking or cleaning the store while opening it failed.
    #[error("scanning chunk store entry {path} at open: {source}; check the store's ownership")]
    Scan {
        /// The entry being examined.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating, writing or syncing a chunk's temp file failed.
    #[error("writing chunk {id} to {path}: {source}")]
    Write {
        /// The chunk.
        id: ChunkId,
        /// The temp file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Renaming a written chunk into its final place failed.
    #[error("moving chunk {id} from {from} to {to}: {source}")]
    Install {
        /// The chunk.
        id: ChunkId,
        /// The temp file.
        from: PathBuf,
        /// The chunk's final path.
        to: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading a stored chunk failed (other than the file being gone).
    #[error("reading chunk {id} from {path}: {source}")]
    Read {
        /// The chunk.
        id: ChunkId,
        /// Its file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Deleting a chunk or temp file failed.
    #[error("deleting {path}: {source}; check the store's ownership and permissions")]
    Remove {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Flushing a directory to disk failed; recently stored chunks may not survive a crash.
    #[error("syncing directory {path} to disk: {source}; recent chunks may not survive a crash")]
    Sync {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `put` was handed a chunk whose encoding does not fit its declared length.
    #[error("refusing to store chunk {id}: {reason}")]
    InvalidChunk {
        /// The chunk.
        id: ChunkId,
        /// What is inconsistent.
        reason: String,
    },
}

/// True for "no space left on device" and "disk quota exceeded".
fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(code) if code == libc::ENOSPC || code == libc::EDQUOT)
}

/// Maps ENOSPC to [`StoreError::NoSpace`] and anything else through `other`.
fn classify(e: io::Error, path: &Path, other: impl FnOnce(io::Error) -> StoreError) -> StoreError {
    if is_no_space(&e) {
        StoreError::NoSpace {
            path: path.to_path_buf(),
        }
    } else {
        other(e)
    }
}

/// What [`DiskStore::evict_to_cap`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictStats {
    /// Chunks deleted.
    pub removed: usize,
    /// Bytes on disk they took.
    pub freed_bytes: u64,
    /// Eviction candidates spared because `keep` asked for them.
    pub kept: usize,
    /// Total size of the store afterwards; above the cap only if `keep` spared too much.
    pub remaining_bytes: u64,
}

/// One indexed chunk.
#[derive(Clone, Copy, Debug)]
struct Meta {
    /// File length (header plus payload).
    size: u64,
    /// Logical time of last use; larger is more recent.
    last_used: u64,
}

/// Everything guarded by the store's mutex.
#[derive(Debug)]
struct State {
    index: HashMap<ChunkId, Meta>,
    /// Sum of `Meta::size`.
    total: u64,
    /// Next logical time.
    clock: u64,
    /// Last mtime the store set or saw; the next one is strictly later.
    last_mtime: SystemTime,
    /// Shard directories known to exist, by first id byte.
    shard_exists: [bool; 256],
    /// Shard directories with renames not yet fsynced.
    shard_dirty: [bool; 256],
    /// `chunks/` gained shard directories not yet fsynced.
    chunks_dirty: bool,
    /// Indexed chunks still in their temp file, awaiting fdatasync and rename.
    pending: HashMap<ChunkId, PathBuf>,
    /// Order in which pending chunks are committed.
    queue: VecDeque<ChunkId>,
    /// Commits taken off the queue and not finished.
    committing: usize,
}

impl State {
    fn tick(&mut self) -> u64 {
        let t = self.clock;
        self.clock += 1;
        t
    }

    fn next_mtime(&mut self) -> SystemTime {
        let now = SystemTime::now();
        let floor = self.last_mtime + MTIME_STEP;
        self.last_mtime = if now > floor { now } else { floor };
        self.last_mtime
    }

    fn remove(&mut self, id: &ChunkId) -> Option<Meta> {
        let meta = self.index.remove(id)?;
        self.total -= meta.size;
        Some(meta)
    }
}

/// The content-addressed chunk store on disk; shared across threads through `&self`.
pub struct DiskStore {
    root: PathBuf,
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    cap: Option<u64>,
    state: Mutex<State>,
    /// Signalled whenever a commit finishes.
    committed: Condvar,
    /// Sequence for temp file names.
    temp_seq: AtomicU64,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("root", &self.root)
            .field("cap", &self.cap)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Creates `path` (and missing parents) as 0700, or tightens an existing directory to 0700.
/// Returns whether it was created.
fn ensure_dir(path: &Path) -> Result<bool, StoreError> {
    let dir_err = |source| StoreError::Dir {
        path: path.to_path_buf(),
        source,
    };
    match fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => Err(StoreError::NotADirectory {
            path: path.to_path_buf(),
        }),
        Ok(meta) => {
            if meta.permissions().mode() & 0o7777 != DIR_MODE {
                fs::set_permissions(path, Permissions::from_mode(DIR_MODE)).map_err(dir_err)?;
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(path)
                .map_err(|e| classify(e, path, dir_err))?;
            // The mode above is filtered by the umask; set it exactly.
            fs::set_permissions(path, Permissions::from_mode(DIR_MODE)).map_err(dir_err)?;
            Ok(true)
        }
        Err(e) => Err(dir_err(e)),
    }
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| StoreError::Sync {
            path: path.to_path_buf(),
            source,
        })
}

fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn shard_name(byte: u8) -> String {
    format!("{byte:02x}")
}

/// The shard byte for a canonical shard directory name (two lower-case hex digits).
fn parse_shard(name: &str) -> Option<u8> {
    let valid = name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        u8::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

/// The id for a canonical chunk file name (64 lower-case hex digits) in shard `shard`.
fn parse_chunk_name(name: &str, shard: u8) -> Option<ChunkId> {
    let id = ChunkId::from_hex(name)?;
    (id.to_hex() == name && id.0[0] == shard).then_some(id)
}

fn header(encoding: Encoding, raw_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = encoding.into();
    h[5..].copy_from_slice(&raw_len.to_le_bytes());
    h
}

/// Splits a chunk file into raw length and encoded payload; `None` if the header is bad.
fn parse_file(mut bytes: Vec<u8>) -> Option<(u32, Encoded)> {
    if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC {
        return None;
    }
    let encoding = Encoding::try_from(bytes[4]).ok()?;
    let raw_len = u32::from_le_bytes(bytes[5..HEADER_LEN].try_into().ok()?);
    bytes.drain(..HEADER_LEN);
    Some((
        raw_len,
        Encoded {
            encoding,
            payload: bytes,
        },
    ))
}

impl DiskStore {
    /// Opens (creating if needed) the store at `root`, capped at `cap_bytes` of chunk files
    /// (`None`: unlimited).
    ///
    /// Tightens the store's directories to 0700 and its files to 0600, deletes leftover temp
    /// files and anything under `chunks/` that is not a well-formed chunk file, and indexes the
    /// rest, least recently used first by mtime.
    pub fn open(root: &Path, cap_bytes: Option<u64>) -> Result<Self, StoreError> {
        ensure_dir(root)?;
        let chunks_dir = root.join("chunks");
        let tmp_dir = root.join("tmp");
        let created_chunks = ensure_dir(&chunks_dir)?;
        let created_tmp = ensure_dir(&tmp_dir)?;
        if created_chunks || created_tmp {
            sync_dir(root)?;
        }
        clear_tmp(&tmp_dir)?;

        let mut state = State {
            index: HashMap::new(),
            total: 0,
            clock: 0,
            last_mtime: SystemTime::UNIX_EPOCH,
            shard_exists: [false; 256],
            shard_dirty: [false; 256],
            chunks_dirty: false,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            committing: 0,
        };
        let mut found = scan_chunks(&chunks_dir, &mut state.shard_exists)?;
        found.sort_unstable_by_key(|&(mtime, id, _)| (mtime, id));
        for (mtime, id, size) in found {
            let last_used = state.tick();
            state.index.insert(id, Meta { size, last_used });
            state.total += size;
            state.last_mtime = state.last_mtime.max(mtime);
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            chunks_dir,
            tmp_dir,
            cap: cap_bytes,
            state: Mutex::new(state),
            committed: Condvar::new(),
            temp_seq: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index inconsistent with itself in a
        // way that matters more than losing the store: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard_dir(&self, id: &ChunkId) -> PathBuf {
        self.chunks_dir.join(shard_name(id.0[0]))
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.shard_dir(id).join(id.to_hex())
    }

    /// Whether the store holds `id` (index lookup, no IO).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state().index.contains_key(id)
    }

    /// Stores a chunk the caller has already verified (see [`crate::codec::decode_verified`]),
    /// in its encoded form. Returns `false`, writing nothing, if the chunk is already present
    /// (it is then marked used).
    ///
    /// The chunk is indexed and readable at once, from its temp file; it reaches its final name
    /// (fdatasync, rename) through [`DiskStore::commit_some`] or [`DiskStore::sync`]. On error
    /// nothing is left behind.
    pub fn put(&self, id: &ChunkId, raw_len: u32, encoded: &Encoded) -> Result<bool, StoreError> {
        check_encoded(id, raw_len, encoded)?;
        if self.contains(id) {
            self.touch(id);
            return Ok(false);
        }
        let temp = self.write_temp(id, raw_len, encoded)?;
        let size = (HEADER_LEN + encoded.payload.len()) as u64;
        let mut state = self.state();
        if state.index.contains_key(id) {
            // Another thread stored the same chunk meanwhile.
            drop(state);
            let _ = fs::remove_file(&temp);
            return Ok(false);
        }
        let last_used = state.tick();
        state.index.insert(*id, Meta { size, last_used });
        state.total += size;
        state.pending.insert(*id, temp);
        state.queue.push_back(*id);
        Ok(true)
    }

    /// Chunks stored by [`DiskStore::put`] and not yet committed.
    pub fn pending(&self) -> usize {
        self.state().queue.len()
    }

    /// Commits up to `max` pending chunks, oldest first: fdatasync of the temp file, then rename
    /// to the final name. Returns how many it committed. Safe to run on several threads at
    /// once; each chunk is committed by exactly one. A chunk whose commit fails is dropped from
    /// the store and the error returned.
    pub fn commit_some(&self, max: usize) -> Result<usize, StoreError> {
        let mut done = 0;
        while done < max {
            let (id, temp) = {
                let mut state = self.state();
                let Some(id) = state.queue.pop_front() else {
                    break;
                };
                let Some(temp) = state.pending.get(&id).cloned() else {
                    continue;
                };
                state.committing += 1;
                (id, temp)
            };
            let result = self.commit_one(&id, &temp);
            let mut state = self.state();
            state.committing -= 1;
            state.pending.remove(&id);
            match result {
                Ok(()) => state.shard_dirty[usize::from(id.0[0])] = true,
                Err(e) => {
                    state.remove(&id);
                    drop(state);
                    let _ = fs::remove_file(&temp);
                    self.committed.notify_all();
                    return Err(e);
                }
            }
            drop(state);
            self.committed.notify_all();
            done += 1;
        }
        Ok(done)
    }

    fn commit_one(&self, id: &ChunkId, temp: &Path) -> Result<(), StoreError> {
        File::open(temp).and_then(|f| f.sync_data()).map_err(|e| {
            classify(e, temp, |source| StoreError::Write {
                id: *id,
                path: temp.to_path_buf(),
                source,
            })
        })?;
        self.install(id, temp, &self.chunk_path(id))
    }

    /// Where a chunk's bytes are now: its temp file while pending, else its final name.
    fn current_path(&self, id: &ChunkId) -> PathBuf {
        match self.state().pending.get(id) {
            Some(temp) => temp.clone(),
            None => self.chunk_path(id),
        }
    }

    /// Writes header and payload to a fresh temp file and sets its mtime.
    /// Returns the temp path; removes the file on failure.
    fn write_temp(
        &self,
        id: &ChunkId,
        raw_len: u32,
        encoded: &Encoded,
    ) -> Result<PathBuf, StoreError> {
        let (path, mut file) = self.create_temp(id)?;
        let mtime = self.state().next_mtime();
        let written = file
            .write_all(&header(encoded.encoding, raw_len))
            .and_then(|()| file.write_all(&encoded.payload))
            .and_then(|()| file.set_modified(mtime));
        match written {
            Ok(()) => Ok(path),
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&path);
                Err(classify(e, &path, |source| StoreError::Write {
                    id: *id,
                    path: path.clone(),
                    source,
                }))
            }
        }
    }

    /// Creates `tmp/<id>.<pid>.<seq>.tmp` with O_EXCL and mode 0600.
    fn create_temp(&self, id: &ChunkId) -> Result<(PathBuf, File), StoreError> {
        let mut attempt = 0;
        loop {
            let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
            let path =
                self.tmp_dir
                    .join(format!("{}.{}.{seq}.tmp", id.to_hex(), std::process::id()));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path);
            match opened {
                Ok(file) => {
                    // The mode above is filtered by the umask; set it exactly.
                    if let Err(e) = file.set_permissions(Permissions::from_mode(FILE_MODE)) {
                        drop(file);
                        let _ = fs::remove_file(&path);
                        return Err(StoreError::Write {
                            id: *id,
                            path,
                            source: e,
                        });
                    }
                    return Ok((path, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(classify(e, &path, |source| StoreError::Write {
                        id: *id,
                        path: path.clone(),
                        source,
                    }))
                }
            }
        }
    }

    /// Makes sure the chunk's shard directory exists, then renames `temp` to `target`.
    fn install(&self, id: &ChunkId, temp: &Path, target: &Path) -> Result<(), StoreError> {
        let shard = usize::from(id.0[0]);
        if !self.state().shard_exists[shard] {
            let dir = self.shard_dir(id);
            let created = DirBuilder::new().mode(DIR_MODE).create(&dir);
            let dir_err = |source| StoreError::Dir {
                path: dir.clone(),
                source,
            };
            match created {
                Ok(()) => {
                    fs::set_permissions(&dir, Permissions::from_mode(DIR_MODE)).map_err(dir_err)?;
                    self.state().chunks_dirty = true;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(classify(e, &dir, dir_err)),
            }
            self.state().shard_exists[shard] = true;
        }
        fs::rename(temp, target).map_err(|e| {
            classify(e, target, |source| StoreError::Install {
                id: *id,
                from: temp.to_path_buf(),
                to: target.to_path_buf(),
                source,
            })
        })
    }

    /// The chunk's raw bytes, decoded and verified against `id`; marks it used.
    ///
    /// `Ok(None)` if the store does not hold it, including when its file turned out corrupt:
    /// the file is then deleted (and a warning logged), so the chunk can be fetched again.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.load(id)?.map(|(raw, _)| raw))
    }

    /// The chunk as stored (encoding and payload), so the source side can re-send it without
    /// recompressing; marks it used. It is verified like [`DiskStore::get`] before being
    /// returned, so a corrupt file is never sent.
    pub fn get_encoded(&self, id: &ChunkId) -> Result<Option<Encoded>, StoreError> {
        Ok(self.load(id)?.map(|(_, encoded)| encoded))
    }

    fn load(&self, id: &ChunkId) -> Result<Option<(Vec<u8>, Encoded)>, StoreError> {
        if !self.contains(id) {
            return Ok(None);
        }
        let mut path = self.current_path(id);
        let mut opened = File::open(&path);
        if matches!(&opened, Err(e) if e.kind() == io::ErrorKind::NotFound) {
            // A commit may have renamed the temp file since we looked.
            path = self.current_path(id);
            opened = File::open(&path);
        }
        let read_err = |source| StoreError::Read {
            id: *id,
            path: path.clone(),
            source,
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Deleted behind our back: the index was stale.
                self.state().remove(id);
                return Ok(None);
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut bytes = Vec::new();
        (&file)
            .take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        let reason = if bytes.len() as u64 > MAX_FILE_LEN {
            "file longer than any chunk".to_string()
        } else {
            match parse_file(bytes) {
                None => "bad header".to_string(),
                Some((raw_len, encoded)) => {
                    match decode_verified(id, raw_len, encoded.encoding, &encoded.payload) {
                        Ok(raw) => {
                            self.mark_used(id, Some(&file));
                            return Ok(Some((raw, encoded)));
                        }
                        Err(e) => e.to_string(),
                    }
                }
            }
        };
        tracing::warn!(chunk = %id, path = %path.display(), %reason, "deleting corrupt chunk");
        let mut state = self.state();
        remove_file(&path)?;
        state.remove(id);
        Ok(None)
    }

    /// Marks a chunk used: it becomes the last candidate for eviction. Also sets its file's
    /// mtime so the order survives a restart; a failure there is only logged.
    pub fn touch(&self, id: &ChunkId) {
        self.mark_used(id, None);
    }

    fn mark_used(&self, id: &ChunkId, open: Option<&File>) {
        let mtime = {
            let mut state = self.state();
            let tick = state.tick();
            match state.index.get_mut(id) {
                Some(meta) => meta.last_used = tick,
                None => return,
            }
            state.next_mtime()
        };
        let path = self.current_path(id);
        let result = match open {
            Some(file) => file.set_modified(mtime),
            None => File::open(&path).and_then(|f| f.set_modified(mtime)),
        };
        match result {
            Ok(()) => {}
            // Renamed by a commit or deleted meanwhile: the order is best effort, and a read
            // notices a missing file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(chunk = %id, path = %path.display(), error = %e, "setting mtime")
            }
        }
    }

    /// Commits every pending chunk (waiting for commits running on other threads), then
    /// flushes the directory entries of every chunk committed since the last call, so they
    /// survive a crash. Call before the process exits, or chunks still pending are lost.
    pub fn sync(&self) -> Result<(), StoreError> {
        loop {
            self.commit_some(usize::MAX)?;
            let mut state = self.state();
            while state.committing > 0 {
                state = self
                    .committed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.queue.is_empty() {
                break;
            }
        }
        let (mut dirty, chunks_dirty) = {
            let mut state = self.state();
            let dirty = std::mem::replace(&mut state.shard_dirty, [false; 256]);
            (dirty, std::mem::take(&mut state.chunks_dirty))
        };
        let mut result = Ok(());
        for shard in 0..=255u8 {
            if dirty[usize::from(shard)] {
                let dir = self.chunks_dir.join(shard_name(shard));
                match sync_dir(&dir) {
                    Ok(()) => dirty[usize::from(shard)] = false,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if result.is_ok() && chunks_dirty {
            result = sync_dir(&self.chunks_dir);
        }
        if result.is_err() {
            // Whatever was not flushed stays dirty for the next call.
            let mut state = self.state();
            for (slot, was) in state.shard_dirty.iter_mut().zip(dirty) {
                *slot |= was;
            }
            state.chunks_dirty |= chunks_dirty;
        }
        result
    }

    /// Deletes least-recently-used chunks, skipping those `keep` says to keep, until the
    /// store's total size is at most its cap. Does nothing without a cap.
    ///
    /// `keep` is called without the store's lock held, so it may use the store. A chunk used
    /// while eviction runs is spared.
    pub fn evict_to_cap(&self, keep: &dyn Fn(&ChunkId) -> bool) -> Result<EvictStats, StoreError> {
        let mut stats = EvictStats::default();
        let Some(cap) = self.cap else {
            stats.remaining_bytes = self.bytes();
            return Ok(stats);
        };
        let mut candidates: Vec<(u64, ChunkId)> = {
            let state = self.state();
            if state.total <= cap {
                stats.remaining_bytes = state.total;
                return Ok(stats);
            }
            state
                .index
                .iter()
                .map(|(id, meta)| (meta.last_used, *id))
                .collect()
        };
        candidates.sort_unstable();
        for (last_used, id) in candidates {
            if self.bytes() <= cap {
                break;
            }
            if keep(&id) {
                stats.kept += 1;
                continue;
            }
            let mut state = self.state();
            match state.index.get(&id) {
                // Still there, not used since the snapshot, and committed.
                Some(meta) if meta.last_used == last_used && !state.pending.contains_key(&id) => {}
                _ => continue,
            }
            // Deleting under the lock keeps a concurrent put of the same id from losing its
            // fresh file to this unlink.
            remove_file(&self.chunk_path(&id))?;
            if let Some(meta) = state.remove(&id) {
                stats.removed += 1;
                stats.freed_bytes += meta.size;
            }
        }
        stats.remaining_bytes = self.bytes();
        Ok(stats)
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.state().index.len()
    }

    /// Whether the store holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total size of the chunk files (headers included), the quantity the cap bounds.
    pub fn bytes(&self) -> u64 {
        self.state().total
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The size cap given at open.
    pub fn cap(&self) -> Option<u64> {
        self.cap
    }
}

/// Refuses encodings that cannot be a chunk of `raw_len` bytes (the store's reader would
/// reject them as corrupt anyway).
fn check_encoded(id: &ChunkId, raw_len: u32, encoded: &Encoded) -> Result<(), StoreError> {
    let reason = if raw_len > MAX_CHUNK_LEN {
        format!("raw length {raw_len} is over the {MAX_CHUNK_LEN}-byte limit")
    } else if encoded.encoding == Encoding::Raw && encoded.payload.len() != raw_len as usize {
        format!(
            "raw payload of {} bytes for a declared {raw_len}",
            encoded.payload.len()
        )
    } else if encoded.payload.len() > raw_len as usize {
        format!(
            "compressed payload of {} bytes is longer than the {raw_len}-byte chunk",
            encoded.payload.len()
        )
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidChunk { id: *id, reason })
}

/// Deletes everything in `tmp/`: only interrupted writes leave files there.
fn clear_tmp(tmp_dir: &Path) -> Result<(), StoreError> {
    let scan_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Scan { path, source }
    };
    for entry in fs::read_dir(tmp_dir).map_err(scan_err(tmp_dir))? {
        let entry = entry.map_err(scan_err(tmp_dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(scan_err(&path))?;
        if kind.is_dir() {
            fs::remove_dir_all(&path).map_err(|source| StoreError::Remove {
                path: path.clone(),
                source,
            })?;
        } else {
            remove_file(&path)?;
        }
    }
    Ok(())
}

/// Lists valid chunk files as (mtime, id, size), fixing permissions and deleting anything that
/// is not a well-formed chunk file name of a plausible size.
fn scan_chunks(
    chunks_dir: &Path,
    shard_exists: &mut [bool; 256],
) -> Result<Vec<(SystemTime, ChunkId, u64)>, StoreError> {
    let scan_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Scan { path, source }
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(chunks_dir).map_err(scan_err(chunks_dir))? {
        let entry = entry.map_err(scan_err(chunks_dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(scan_err(&path))?;
        let shard = entry.file_name().to_str().and_then(parse_shard);
        let shard = match (kind.is_dir(), shard) {
            (true, Some(shard)) => shard,
            (true, None) => {
                tracing::warn!(path = %path.display(), "ignoring unknown directory in chunk store");
                continue;
            }
            (false, _) => {
                tracing::warn!(path = %path.display(), "deleting stray file in chunk store");
                remove_file(&path)?;
                continue;
            }
        };
        ensure_dir(&path)?;
        shard_exists[usize::from(shard)] = true;
        for file in fs::read_dir(&path).map_err(scan_err(&path))? {
            let file = file.map_err(scan_err(&path))?;
            let file_path = file.path();
            let kind = file.file_type().map_err(scan_err(&file_path))?;
            let id = file
                .file_name()
                .to_str()
                .and_then(|name| parse_chunk_name(name, shard));
            let Some(id) = id.filter(|_| kind.is_file()) else {
                tracing::warn!(path = %file_path.display(), "deleting stray entry in chunk store");
                if kind.is_dir() {
                    fs::remove_dir_all(&file_path).map_err(|source| StoreError::Remove {
                        path: file_path.clone(),
                        source,
                    })?;
                } else {
                    remove_file(&file_path)?;
                }
                continue;
            };
            let meta = file.metadata().map_err(scan_err(&file_path))?;
            let size = meta.len();
            if !(HEADER_LEN as u64..=MAX_FILE_LEN).contains(&size) {
                tracing::warn!(path = %file_path.display(), size, "deleting chunk of impossible size");
                remove_file(&file_path)?;
                continue;
            }
            if meta.permissions().mode() & 0o7777 != FILE_MODE {
                fs::set_permissions(&file_path, Permissions::from_mode(FILE_MODE))
                    .map_err(scan_err(&file_path))?;
            }
            let mtime = meta.modified().map_err(scan_err(&file_path))?;
            found.push((mtime, id, size));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;

    fn chunk(seed: u64, len: usize, compressible: bool) -> (ChunkId, u32, Encoded, Vec<u8>) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let raw: Vec<u8> = if compressible {
            (0..len)
                .map(|i| b"abcabcabd"[i % 9] ^ (seed as u8))
                .collect()
        } else {
            let mut v = vec![0u8; len];
            rng.fill(&mut v);
            v
        };
        let encoded = encode(&raw, 3);
        (ChunkId::of(&raw), len as u32, encoded, raw)
    }

    /// Puts and commits at once, as the tests of durable behaviour need.
    fn put_now(store: &DiskStore, id: &ChunkId, len: u32, encoded: &Encoded) -> bool {
        let stored = store.put(id, len, encoded).unwrap();
        store.sync().unwrap();
        stored
    }

    #[test]
    fn a_pending_chunk_is_readable_and_a_crash_before_commit_loses_it_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, encoded, raw) = chunk(11, 40_000, true);
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            assert!(store.put(&id, len, &encoded).unwrap());
            assert_eq!(store.pending(), 1);
            assert!(store.contains(&id));
            assert_eq!(
                store.get(&id).unwrap().unwrap(),
                raw,
                "readable before its commit"
            );
            assert!(
                !store.chunk_path(&id).exists(),
                "no final name before fdatasync"
            );
            // "Crash": the store goes away with the chunk uncommitted.
        }
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert!(
            !store.contains(&id),
            "an uncommitted chunk is gone, not corrupt"
        );
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
        assert!(put_now(&store, &id, len, &encoded));
        assert!(store.chunk_path(&id).exists());
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn commits_from_several_threads_each_commit_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let chunks: Vec<_> = (0..64).map(|i| chunk(100 + i, 3000, i % 2 == 0)).collect();
        for (id, len, enc, _) in &chunks {
            store.put(id, *len, enc).unwrap();
        }
        let committed: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| store.commit_some(usize::MAX).unwrap()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(committed, 64);
        store.sync().unwrap();
        for (id, _, _, raw) in &chunks {
            assert!(store.chunk_path(id).exists());
            assert_eq!(&store.get(id).unwrap().unwrap(), raw);
        }
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn files_in(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn put_get_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert!(store.is_empty());
        let (id, len, encoded, raw) = chunk(1, 70_000, true);
        assert_eq!(encoded.encoding, Encoding::Zstd);
        assert!(!store.contains(&id));
        assert_eq!(store.get(&id).unwrap(), None);
        assert!(put_now(&store, &id, len, &encoded));
        assert!(store.contains(&id));
        assert!(
            !put_now(&store, &id, len, &encoded),
            "second put is a no-op"
        );
        assert_eq!(store.len(), 1);
        assert_eq!(store.bytes(), (HEADER_LEN + encoded.payload.len()) as u64);
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
        assert_eq!(store.get_encoded(&id).unwrap().unwrap(), encoded);

        let (id2, len2, encoded2, raw2) = chunk(2, 20_000, false);
        assert_eq!(encoded2.encoding, Encoding::Raw);
        assert!(put_now(&store, &id2, len2, &encoded2));
        assert_eq!(store.get(&id2).unwrap().unwrap(), raw2);
        store.sync().unwrap();
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..20)
            .map(|i| chunk(i, 5_000 + i as usize, i % 2 == 0))
            .collect();
        let bytes = {
            let store = DiskStore::open(dir.path(), None).unwrap();
            for (id, len, encoded, _) in &chunks {
                put_now(&store, id, *len, encoded);
            }
            store.sync().unwrap();
            store.bytes()
        };
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), chunks.len());
        assert_eq!(store.bytes(), bytes);
        for (id, _, _, raw) in &chunks {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
    }

    #[test]
    fn permissions_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        let store = DiskStore::open(&root, None).unwrap();
        let (id, len, encoded, _) = chunk(3, 1000, true);
        put_now(&store, &id, len, &encoded);
        assert_eq!(mode(&root), 0o700, "loose root is tightened");
        assert_eq!(mode(&root.join("chunks")), 0o700);
        assert_eq!(mode(&root.join("tmp")), 0o700);
        assert_eq!(mode(&store.shard_dir(&id)), 0o700);
        assert_eq!(mode(&store.chunk_path(&id)), 0o600);

        // Loosened behind the store's back: tightened again at the next open.
        fs::set_permissions(store.chunk_path(&id), Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(store.shard_dir(&id), Permissions::from_mode(0o755)).unwrap();
        drop(store);
        let store = DiskStore::open(&root, None).unwrap();
        assert_eq!(mode(&store.shard_dir(&id)), 0o700);
        assert_eq!(mode(&store.chunk_path(&id)), 0o600);
    }

    #[test]
    fn crash_before_rename_leaves_no_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, encoded, raw) = chunk(4, 30_000, true);
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            let temp = store.write_temp(&id, len, &encoded).unwrap();
            assert!(temp.starts_with(dir.path().join("tmp")));
            assert_eq!(mode(&temp), 0o600);
            // "Crash": the store goes away without renaming.
        }
        assert_eq!(files_in(&dir.path().join("tmp")), 1);
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert!(!store.contains(&id));
        assert!(!store.chunk_path(&id).exists());
        assert_eq!(files_in(&dir.path().join("tmp")), 0, "leftovers removed");
        assert!(put_now(&store, &id, len, &encoded));
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
    }

    #[test]
    fn open_deletes_stray_names() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, encoded, _) = chunk(5, 2000, true);
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            put_now(&store, &id, len, &encoded);
        }
        let chunks = dir.path().join("chunks");
        let shard = chunks.join(shard_name(id.0[0]));
        let strays = [
            chunks.join("junk"),
            shard.join("not-an-id"),
            shard.join(id.to_hex().to_uppercase()),
            // A valid id in the wrong shard.
            shard.join(ChunkId::of(b"elsewhere").to_hex()),
        ];
        for stray in &strays {
            fs::write(stray, b"CKS1garbage").unwrap();
        }
        let truncated = ChunkId([id.0[0]; 32]);
        fs::write(shard.join(truncated.to_hex()), b"CK").unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.contains(&id));
        assert!(!store.contains(&truncated));
        for stray in &strays {
            assert!(!stray.exists(), "{} survived", stray.display());
        }
        assert_eq!(files_in(&shard), 1);
    }

    #[test]
    fn corrupt_file_is_deleted_and_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (a, a_len, a_enc, _) = chunk(6, 40_000, true);
        let (b, b_len, b_enc, _) = chunk(7, 40_000, false);
        let (c, c_len, c_enc, _) = chunk(8, 40_000, true);
        for (id, len, enc) in [
            (&a, a_len, &a_enc),
            (&b, b_len, &b_enc),
            (&c, c_len, &c_enc),
        ] {
            put_now(&store, id, len, enc);
        }
        // a: payload byte flipped; b: raw byte flipped; c: header magic damaged.
        for (id, pos) in [(&a, HEADER_LEN + 10), (&b, HEADER_LEN + 1000), (&c, 0)] {
            let path = store.chunk_path(id);
            let mut bytes = fs::read(&path).unwrap();
            bytes[pos] ^= 0x55;
            fs::write(&path, bytes).unwrap();
        }
        assert_eq!(store.get(&a).unwrap(), None);
        assert_eq!(store.get_encoded(&b).unwrap(), None);
        assert_eq!(store.get(&c).unwrap(), None);
        for id in [&a, &b, &c] {
            assert!(!store.contains(id));
            assert!(!store.chunk_path(id).exists());
        }
        assert_eq!(store.len(), 0);
        assert_eq!(store.bytes(), 0);
        // It can be fetched and stored again.
        assert!(put_now(&store, &a, a_len, &a_enc));
        assert!(store.get(&a).unwrap().is_some());
    }

    #[test]
    fn file_deleted_behind_the_store_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (id, len, enc, _) = chunk(9, 3000, true);
        put_now(&store, &id, len, &enc);
        fs::remove_file(store.chunk_path(&id)).unwrap();
        assert_eq!(store.get(&id).unwrap(), None);
        assert!(!store.contains(&id));
        assert_eq!(store.bytes(), 0);
    }

    fn sized_store(dir: &Path, cap: Option<u64>) -> (DiskStore, Vec<ChunkId>, u64) {
        let store = DiskStore::open(dir, cap).unwrap();
        let mut ids = Vec::new();
        let mut size = 0;
        for i in 0..5 {
            // Random data stays raw: every file has the same size.
            let (id, len, enc, _) = chunk(100 + i, 10_000, false);
            size = (HEADER_LEN + enc.payload.len()) as u64;
            put_now(&store, &id, len, &enc);
            ids.push(id);
        }
        (store, ids, size)
    }

    #[test]
    fn eviction_is_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (_, _, size) = sized_store(probe.path(), None);
        let (store, ids, _) = sized_store(dir.path(), Some(3 * size));
        assert_eq!(store.bytes(), 5 * size, "put never evicts");
        // ids[0] is the oldest; using it saves it. ids[1] is read, which also counts as use.
        store.touch(&ids[0]);
        store.get(&ids[1]).unwrap().unwrap();
        let stats = store.evict_to_cap(&|_| false).unwrap();
        assert_eq!(stats.removed, 2);
        assert_eq!(stats.freed_bytes, 2 * size);
        assert_eq!(stats.kept, 0);
        assert_eq!(stats.remaining_bytes, 3 * size);
        assert_eq!(store.bytes(), 3 * size);
        let alive: Vec<bool> = ids.iter().map(|id| store.contains(id)).collect();
        assert_eq!(alive, [true, true, false, false, true]);
        assert!(!store.chunk_path(&ids[2]).exists());
        assert!(!store.chunk_path(&ids[3]).exists());
        // Within the cap: nothing more to do.
        assert_eq!(store.evict_to_cap(&|_| false).unwrap().removed, 0);
    }

    #[test]
    fn eviction_respects_keep() {
        let dir = tempfile::tempdir().unwrap();
        let probe = tempfile::tempdir().unwrap();
        let (_, _, size) = sized_store(probe.path(), None);
        let (store, ids, _) = sized_store(dir.path(), Some(2 * size));
        let protected = [ids[0], ids[1]];
        // keep may use the store: it runs without the lock.
        let keep = |id: &ChunkId| protected.contains(id) && store.contains(id);
        let stats = store.evict_to_cap(&keep).unwrap();
        assert_eq!(stats.kept, 2);
        assert_eq!(stats.removed, 3);
        assert!(store.contains(&ids[0]) && store.contains(&ids[1]));
        assert_eq!(store.len(), 2);
        assert!(store.bytes() <= 2 * size);

        // Keeping everything leaves the store over the cap, and says so.
        let (id, len, enc, _) = chunk(200, 10_000, false);
        put_now(&store, &id, len, &enc);
        let stats = store.evict_to_cap(&|_| true).unwrap();
        assert_eq!(stats.removed, 0);
        assert_eq!(stats.kept, 3);
        assert_eq!(stats.remaining_bytes, 3 * size);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn lru_order_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, size) = {
            let (store, ids, size) = sized_store(dir.path(), None);
            store.touch(&ids[1]);
            store.get(&ids[0]).unwrap().unwrap();
            (ids, size)
        };
        // Order by last use is now 2, 3, 4, 1, 0: only the mtimes carry it to the new index.
        let store = DiskStore::open(dir.path(), Some(2 * size)).unwrap();
        assert_eq!(store.len(), 5);
        store.evict_to_cap(&|_| false).unwrap();
        let alive: Vec<bool> = ids.iter().map(|id| store.contains(id)).collect();
        assert_eq!(alive, [true, true, false, false, false]);
    }

    #[test]
    fn no_cap_never_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids, size) = sized_store(dir.path(), None);
        let stats = store.evict_to_cap(&|_| false).unwrap();
        assert_eq!(stats.removed, 0);
        assert_eq!(stats.remaining_bytes, 5 * size);
        assert_eq!(store.len(), ids.len());
    }

    #[test]
    fn inconsistent_chunks_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let id = ChunkId::of(b"abc");
        let raw = Encoded {
            encoding: Encoding::Raw,
            payload: b"abc".to_vec(),
        };
        let err = store.put(&id, 4, &raw).unwrap_err();
        assert!(matches!(err, StoreError::InvalidChunk { .. }), "{err}");
        let err = store.put(&id, MAX_CHUNK_LEN + 1, &raw).unwrap_err();
        assert!(matches!(err, StoreError::InvalidChunk { .. }), "{err}");
        assert!(store.is_empty());
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn failed_install_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (id, len, enc, _) = chunk(10, 5000, true);
        // A directory squatting the chunk's final name makes the rename fail.
        fs::create_dir_all(store.chunk_path(&id).join("squat")).unwrap();
        assert!(
            store.put(&id, len, &enc).unwrap(),
            "indexed at once, from its temp file"
        );
        let err = store.sync().unwrap_err();
        assert!(matches!(err, StoreError::Install { .. }), "{err}");
        assert!(err.to_string().contains(&id.to_hex()[..16]), "{err}");
        assert!(!store.contains(&id));
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn no_space_is_its_own_error() {
        let path = Path::new("/store/tmp/x");
        let err = classify(io::Error::from_raw_os_error(libc::ENOSPC), path, |source| {
            StoreError::Remove {
                path: path.to_path_buf(),
                source,
            }
        });
        assert!(matches!(&err, StoreError::NoSpace { path: p } if p == path));
        assert!(err.to_string().contains("full"), "{err}");
        let err = classify(io::Error::from_raw_os_error(libc::EACCES), path, |source| {
            StoreError::Remove {
                path: path.to_path_buf(),
                source,
            }
        });
        assert!(matches!(err, StoreError::Remove { .. }));
    }

    #[test]
    fn root_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = DiskStore::open(&file, None).unwrap_err();
        assert!(matches!(err, StoreError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn concurrent_puts_keep_the_index_consistent() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DiskStore>();
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let chunks: Vec<_> = (0..32).map(|i| chunk(300 + i, 4000, i % 3 == 0)).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for (id, len, enc, _) in &chunks {
                        put_now(&store, id, *len, enc);
                    }
                });
            }
        });
        store.sync().unwrap();
        let expected: u64 = chunks
            .iter()
            .map(|(_, _, enc, _)| (HEADER_LEN + enc.payload.len()) as u64)
            .sum();
        assert_eq!(store.len(), chunks.len());
        assert_eq!(store.bytes(), expected);
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
        for (id, _, _, raw) in &chunks {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
        drop(store);
        assert_eq!(DiskStore::open(dir.path(), None).unwrap().bytes(), expected);
    }
}
