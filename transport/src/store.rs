//! The destination's on-disk, content-addressed chunk store, kept across transfers.
//!
//! Every chunk ever received is kept here under its id, so a later transfer only asks for the
//! chunks the store lacks. Chunks are stored in their encoded form (what came over the wire), so
//! storing costs no compression and disk bandwidth is saved; reading decodes and re-verifies the
//! blake3 id, so disk corruption is caught: a corrupt record is dropped from the index (with a
//! warning) and the chunk reported as missing, to be fetched again.
//!
//! Why packs: one file per chunk (~16k files per GiB) made the kernel's inode allocation,
//! open/fchmod/futimens/rename and one fdatasync per chunk the bottleneck of a whole transfer.
//! Chunks are therefore appended to pack files of about 32 MiB, so those costs are paid once per
//! pack instead of once per chunk.
//!
//! Layout: `ROOT/packs/<16 hex digits>.pack` are committed, immutable packs; `ROOT/tmp/` holds
//! the open pack being appended to and sealed packs awaiting their commit, under the same
//! names. Directories are 0700 and files 0600, set explicitly whatever the umask. A pack is an
//! 8-byte header (magic `CKP1`, format version as little-endian `u32`) followed by records:
//! magic `CKR1`, the 32-byte id, the [`Encoding`] byte, the raw length and the payload length
//! (both little-endian `u32`), then the payload.
//!
//! Writing: [`DiskStore::put`] reserves the record's offset in the open pack under the store's
//! lock, then writes it with `pwrite` outside the lock, so several threads append at once. The
//! chunk is indexed only once its write has finished, so a reader never sees a half-written
//! record; a concurrent put of the same id meanwhile writes a duplicate record, which is only
//! dead space (the first one finished is indexed). A chunk is readable as soon as `put` returns
//! (from the open pack). When the open pack reaches its target size it is sealed and queued for
//! commit, and the next put opens a new one.
//!
//! Crash safety: a pack reaches its final name only as temp file (O_EXCL), `fdatasync`, rename,
//! so a final name only ever holds complete records. The fdatasync is taken off the transfer's
//! critical path: [`DiskStore::commit_some`], run by the caller on as many threads as it likes,
//! commits sealed packs; [`DiskStore::sync`] seals the open pack, commits everything and fsyncs
//! `packs/`. Chunks not committed when the process dies are simply gone (their pack in `tmp/` is
//! removed by the next [`DiskStore::open`]) and are fetched again by the next transfer that needs
//! them. [`DiskStore::open`] indexes only the valid prefix of a pack whose tail is garbled or cut
//! short, and deletes packs with a foreign header and stray files. A pack whose append failed
//! (say, the disk filled up) is cut back to before the failed record when committed.
//!
//! Size cap and eviction, per pack: the index maps id → (pack, offset, length), and each pack
//! has a last use, the latest use of any of its chunks. That order survives a restart through
//! the packs' mtimes, which [`DiskStore::sync`] and [`DiskStore::evict_to_cap`] set on packs used
//! since (not every read). Nothing is evicted during `put`; [`DiskStore::evict_to_cap`] deletes
//! whole committed packs, least recently used first, sparing any pack holding a chunk the caller
//! still needs, until the store fits its cap. The space of a corrupt or duplicate record is only
//! reclaimed when its pack is evicted. An old per-chunk store (`ROOT/chunks/`) is deleted at
//! open. One [`DiskStore`] per root at a time: a second one opening the same root would delete
//! the first one's uncommitted packs.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::codec::{decode_verified, Encoded, Encoding};
use crate::{ChunkId, MAX_CHUNK_LEN};

/// First bytes of every pack file.
const PACK_MAGIC: [u8; 4] = *b"CKP1";
/// Pack format version, after the magic.
const PACK_VERSION: u32 = 1;
/// Magic and version.
const PACK_HEADER_LEN: u64 = 8;
/// First bytes of every record in a pack.
const RECORD_MAGIC: [u8; 4] = *b"CKR1";
/// Magic, id, encoding byte, raw length, payload length.
const RECORD_HEADER_LEN: usize = 4 + 32 + 1 + 4 + 4;
/// A pack is sealed once it is at least this long.
const PACK_TARGET: u64 = 32 << 20;
/// Committed packs kept open for reading at once.
const MAX_OPEN_PACKS: usize = 64;
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// Step between the mtimes the store sets, so use order is strict even within a clock tick.
const MTIME_STEP: Duration = Duration::from_micros(1);

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
    /// Creating a pack or appending a chunk's record to it failed.
    #[error("writing chunk {id} to {path}: {source}")]
    Write {
        /// The chunk.
        id: ChunkId,
        /// The pack being written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Flushing a sealed pack to disk (or cutting off a failed append) failed.
    #[error("flushing pack {path} to disk: {source}")]
    Commit {
        /// The pack, still under `tmp/`.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Renaming a flushed pack into its final place failed.
    #[error("moving pack {from} to {to}: {source}")]
    Install {
        /// The pack under `tmp/`.
        from: PathBuf,
        /// Its final path.
        to: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading a stored chunk failed (other than its record being corrupt).
    #[error("reading chunk {id} from {path}: {source}")]
    Read {
        /// The chunk.
        id: ChunkId,
        /// Its pack.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Deleting a pack or temp file failed.
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

/// What [`DiskStore::evict_to_cap`] did. Eviction is per pack: `removed` counts the chunks of
/// the deleted packs, `kept` the packs spared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictStats {
    /// Chunks deleted (with their packs).
    pub removed: usize,
    /// Bytes on disk the deleted packs took.
    pub freed_bytes: u64,
    /// Eviction candidates (packs) spared because `keep` asked for one of their chunks.
    pub kept: usize,
    /// Total size of the store afterwards; above the cap only if `keep` spared too much.
    pub remaining_bytes: u64,
}

/// Where an indexed chunk's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    /// The pack's sequence number (its file name).
    pack: u64,
    /// Offset of the record header in the pack.
    offset: u64,
    /// Length of the payload after the record header.
    payload_len: u32,
}

/// One pack file, open, sealed or committed.
#[derive(Debug)]
struct Pack {
    /// File length, counting records reserved and not yet written.
    size: u64,
    /// Records reserved (written, in flight or failed).
    records: usize,
    /// Chunks indexed in this pack; some may since have been dropped from the index.
    ids: Vec<ChunkId>,
    /// Logical time of the last use of any of its chunks; larger is more recent.
    last_used: u64,
    /// Used since its mtime was last set.
    touched: bool,
    /// No more appends: queued for commit (or committed).
    sealed: bool,
    /// Under `packs/`, immutable.
    committed: bool,
    /// Appends reserved and not finished.
    writers: usize,
    /// Offset of the first record whose write failed: the pack is cut there at commit.
    broken_at: Option<u64>,
    /// Open handle; always there for uncommitted packs (read and write), cached for committed
    /// ones (at most [`MAX_OPEN_PACKS`]).
    file: Option<Arc<File>>,
}

impl Pack {
    fn new(size: u64, last_used: u64, file: Option<Arc<File>>) -> Self {
        Pack {
            size,
            records: 0,
            ids: Vec::new(),
            last_used,
            touched: false,
            sealed: false,
            committed: false,
            writers: 0,
            broken_at: None,
            file,
        }
    }
}

/// Everything guarded by the store's mutex.
#[derive(Debug)]
struct State {
    index: HashMap<ChunkId, Loc>,
    packs: HashMap<u64, Pack>,
    /// The pack puts append to, if any.
    open: Option<u64>,
    /// Sequence number of the next pack.
    next_seq: u64,
    /// Sealed packs awaiting commit, oldest first.
    queue: VecDeque<u64>,
    /// Commits taken off the queue and not finished.
    committing: usize,
    /// Sum of `Pack::size`.
    total: u64,
    /// Next logical time.
    clock: u64,
    /// Last mtime the store set or saw; the next one is strictly later.
    last_mtime: SystemTime,
    /// `packs/` gained names not yet fsynced.
    packs_dirty: bool,
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

    /// Marks an indexed chunk used; false if it is not indexed.
    fn mark_used(&mut self, id: &ChunkId) -> bool {
        let Some(seq) = self.index.get(id).map(|loc| loc.pack) else {
            return false;
        };
        let tick = self.tick();
        if let Some(pack) = self.packs.get_mut(&seq) {
            pack.last_used = tick;
            pack.touched = true;
        }
        true
    }

    /// Seals the open pack, if any, and queues it for commit.
    fn seal_open(&mut self) {
        if let Some(seq) = self.open.take() {
            if let Some(pack) = self.packs.get_mut(&seq) {
                pack.sealed = true;
            }
            self.queue.push_back(seq);
        }
    }

    /// Chunks of pack `seq` still indexed there.
    fn live_ids(&self, seq: u64) -> Vec<ChunkId> {
        self.packs.get(&seq).map_or_else(Vec::new, |pack| {
            pack.ids
                .iter()
                .filter(|id| self.index.get(id).is_some_and(|loc| loc.pack == seq))
                .copied()
                .collect()
        })
    }

    /// Forgets pack `seq` and the chunks indexed in it; returns (chunks dropped, its size).
    fn drop_pack(&mut self, seq: u64) -> (usize, u64) {
        let live = self.live_ids(seq);
        for id in &live {
            self.index.remove(id);
        }
        let size = self.packs.remove(&seq).map_or(0, |pack| pack.size);
        self.total -= size;
        if self.open == Some(seq) {
            self.open = None;
        }
        (live.len(), size)
    }

    /// Cuts pack `seq` at `at`, dropping the chunks indexed at or after it.
    fn cut_pack(&mut self, seq: u64, at: u64) {
        let live = self.live_ids(seq);
        for id in live {
            if self.index.get(&id).is_some_and(|loc| loc.offset >= at) {
                self.index.remove(&id);
            }
        }
        if let Some(pack) = self.packs.get_mut(&seq) {
            let index = &self.index;
            pack.ids
                .retain(|id| index.get(id).is_some_and(|loc| loc.pack == seq));
            self.total -= pack.size.saturating_sub(at);
            pack.size = pack.size.min(at);
        }
    }
}

/// The content-addressed chunk store on disk; shared across threads through `&self`.
pub struct DiskStore {
    root: PathBuf,
    packs_dir: PathBuf,
    tmp_dir: PathBuf,
    cap: Option<u64>,
    /// A pack is sealed once at least this long.
    pack_target: u64,
    state: Mutex<State>,
    /// Signalled whenever an append or a commit finishes.
    changed: Condvar,
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

fn remove_entry(path: &Path, is_dir: bool) -> Result<(), StoreError> {
    if is_dir {
        fs::remove_dir_all(path).map_err(|source| StoreError::Remove {
            path: path.to_path_buf(),
            source,
        })
    } else {
        remove_file(path)
    }
}

fn pack_name(seq: u64) -> String {
    format!("{seq:016x}.pack")
}

/// The sequence number for a canonical pack name (16 lower-case hex digits, `.pack`).
fn parse_pack_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    let valid = hex.len() == 16
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        u64::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

fn pack_header() -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..4].copy_from_slice(&PACK_MAGIC);
    h[4..].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

fn record_header(
    id: &ChunkId,
    encoding: Encoding,
    raw_len: u32,
    payload_len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&RECORD_MAGIC);
    h[4..36].copy_from_slice(&id.0);
    h[36] = encoding.into();
    h[37..41].copy_from_slice(&raw_len.to_le_bytes());
    h[41..45].copy_from_slice(&payload_len.to_le_bytes());
    h
}

/// A parsed record header.
#[derive(Clone, Copy, Debug)]
struct RecordHeader {
    id: ChunkId,
    encoding: Encoding,
    raw_len: u32,
    payload_len: u32,
}

/// Parses a record header; `None` if it cannot be one the store wrote.
fn parse_record_header(h: &[u8]) -> Option<RecordHeader> {
    if h.len() < RECORD_HEADER_LEN || h[..4] != RECORD_MAGIC {
        return None;
    }
    let id = ChunkId(h[4..36].try_into().ok()?);
    let encoding = Encoding::try_from(h[36]).ok()?;
    let raw_len = u32::from_le_bytes(h[37..41].try_into().ok()?);
    let payload_len = u32::from_le_bytes(h[41..45].try_into().ok()?);
    let plausible = raw_len <= MAX_CHUNK_LEN
        && payload_len <= raw_len
        && (encoding != Encoding::Raw || payload_len == raw_len);
    plausible.then_some(RecordHeader {
        id,
        encoding,
        raw_len,
        payload_len,
    })
}

/// Whether a commit put a pack in place or found nothing worth keeping in it.
enum Committed {
    Installed,
    Discarded,
}

impl DiskStore {
    /// Opens (creating if needed) the store at `root`, capped at `cap_bytes` of pack files
    /// (`None`: unlimited).
    ///
    /// Tightens the store's directories to 0700 and its files to 0600, deletes uncommitted packs
    /// (everything in `tmp/`), an old per-chunk layout and anything under `packs/` that is not a
    /// pack, and indexes the valid records of the rest, least recently used first by mtime.
    pub fn open(root: &Path, cap_bytes: Option<u64>) -> Result<Self, StoreError> {
        Self::open_with(root, cap_bytes, PACK_TARGET)
    }

    /// [`DiskStore::open`] with packs sealed at `pack_target` bytes.
    fn open_with(
        root: &Path,
        cap_bytes: Option<u64>,
        pack_target: u64,
    ) -> Result<Self, StoreError> {
        ensure_dir(root)?;
        let packs_dir = root.join("packs");
        let tmp_dir = root.join("tmp");
        let created_packs = ensure_dir(&packs_dir)?;
        let created_tmp = ensure_dir(&tmp_dir)?;
        if created_packs || created_tmp {
            sync_dir(root)?;
        }
        clear_tmp(&tmp_dir)?;
        let legacy = root.join("chunks");
        if fs::symlink_metadata(&legacy).is_ok_and(|m| m.is_dir()) {
            tracing::warn!(path = %legacy.display(), "deleting a chunk store in the old one-file-per-chunk layout");
            remove_entry(&legacy, true)?;
        }

        let mut state = State {
            index: HashMap::new(),
            packs: HashMap::new(),
            open: None,
            next_seq: 0,
            queue: VecDeque::new(),
            committing: 0,
            total: 0,
            clock: 0,
            last_mtime: SystemTime::UNIX_EPOCH,
            packs_dirty: false,
        };
        let mut found = scan_packs(&packs_dir)?;
        found.sort_unstable_by_key(|p| (p.mtime, p.seq));
        for scanned in found {
            let last_used = state.tick();
            let mut pack = Pack::new(scanned.size, last_used, None);
            pack.sealed = true;
            pack.committed = true;
            for (id, loc) in scanned.records {
                pack.records += 1;
                if let std::collections::hash_map::Entry::Vacant(slot) = state.index.entry(id) {
                    slot.insert(loc);
                    pack.ids.push(id);
                }
            }
            state.total += pack.size;
            state.last_mtime = state.last_mtime.max(scanned.mtime);
            state.next_seq = state.next_seq.max(scanned.seq + 1);
            state.packs.insert(scanned.seq, pack);
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            packs_dir,
            tmp_dir,
            cap: cap_bytes,
            pack_target,
            state: Mutex::new(state),
            changed: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index inconsistent with itself in a
        // way that matters more than losing the store: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(state).unwrap_or_else(|e| e.into_inner())
    }

    fn tmp_path(&self, seq: u64) -> PathBuf {
        self.tmp_dir.join(pack_name(seq))
    }

    fn pack_path(&self, seq: u64) -> PathBuf {
        self.packs_dir.join(pack_name(seq))
    }

    /// Where pack `seq` is now.
    fn current_path(&self, state: &State, seq: u64) -> PathBuf {
        match state.packs.get(&seq) {
            Some(pack) if !pack.committed => self.tmp_path(seq),
            _ => self.pack_path(seq),
        }
    }

    /// Whether the store holds `id` (index lookup, no IO).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state().index.contains_key(id)
    }

    /// Stores a chunk the caller has already verified (see [`crate::codec::decode_verified`]),
    /// in its encoded form. Returns `false`, writing nothing, if the chunk is already present
    /// (it is then marked used).
    ///
    /// The record is appended to the open pack and the chunk indexed once written, so it is
    /// readable when this returns; it becomes durable when its pack is committed through
    /// [`DiskStore::commit_some`] or [`DiskStore::sync`]. On error the chunk is not indexed; the
    /// pack it was going to is sealed and cut back before the failed record when committed.
    pub fn put(&self, id: &ChunkId, raw_len: u32, encoded: &Encoded) -> Result<bool, StoreError> {
        self.put_payload(id, raw_len, encoded.encoding, &encoded.payload)
    }

    /// [`DiskStore::put`] of a chunk encoded as `encoding` into `payload`, written as it
    /// lies: a receiver stores the payload it was sent without copying it first.
    pub fn put_payload(
        &self,
        id: &ChunkId,
        raw_len: u32,
        encoding: Encoding,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        check_encoded(id, raw_len, encoding, payload)?;
        let payload_len = payload.len() as u32;
        let len = (RECORD_HEADER_LEN + payload.len()) as u64;
        let (seq, offset, file) = {
            let mut state = self.state();
            if state.mark_used(id) {
                return Ok(false);
            }
            let seq = match state.open {
                Some(seq) => seq,
                None => self.new_pack(&mut state, id)?,
            };
            let pack = state.packs.get_mut(&seq).expect("the open pack is listed");
            let offset = pack.size;
            pack.size += len;
            pack.records += 1;
            pack.writers += 1;
            let file = pack.file.clone().expect("an uncommitted pack is open");
            let full = pack.size >= self.pack_target;
            state.total += len;
            if full {
                state.seal_open();
            }
            (seq, offset, file)
        };
        // Header and payload in two writes rather than one copied record: the range is this
        // put's alone, and the chunk is indexed only once both are in.
        let header = record_header(id, encoding, raw_len, payload_len);
        let written = file
            .write_all_at(&header, offset)
            .and_then(|()| file.write_all_at(payload, offset + RECORD_HEADER_LEN as u64));

        let mut guard = self.state();
        let tick = guard.tick();
        let state = &mut *guard;
        let pack = state
            .packs
            .get_mut(&seq)
            .expect("a pack with appends in flight is never dropped");
        pack.writers -= 1;
        let result = match written {
            Ok(()) => {
                pack.last_used = tick;
                pack.touched = true;
                if state.index.contains_key(id) {
                    // Another put of the same chunk finished first: this record is dead space.
                    Ok(false)
                } else {
                    pack.ids.push(*id);
                    let loc = Loc {
                        pack: seq,
                        offset,
                        payload_len,
                    };
                    state.index.insert(*id, loc);
                    Ok(true)
                }
            }
            Err(e) => {
                pack.broken_at = Some(pack.broken_at.map_or(offset, |at| at.min(offset)));
                if state.open == Some(seq) {
                    state.seal_open();
                }
                let path = self.tmp_path(seq);
                Err(classify(e, &path, |source| StoreError::Write {
                    id: *id,
                    path: path.clone(),
                    source,
                }))
            }
        };
        drop(guard);
        self.changed.notify_all();
        result
    }

    /// Creates `tmp/<seq>.pack` (O_EXCL, 0600) with its header and makes it the open pack.
    fn new_pack(&self, state: &mut State, id: &ChunkId) -> Result<u64, StoreError> {
        let seq = state.next_seq;
        state.next_seq += 1;
        let path = self.tmp_path(seq);
        let write_err = |e| {
            classify(e, &path, |source| StoreError::Write {
                id: *id,
                path: path.clone(),
                source,
            })
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(write_err)?;
        // The mode above is filtered by the umask; set it exactly.
        let ready = file
            .set_permissions(Permissions::from_mode(FILE_MODE))
            .and_then(|()| file.write_all_at(&pack_header(), 0));
        if let Err(e) = ready {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(write_err(e));
        }
        let last_used = state.tick();
        state.packs.insert(
            seq,
            Pack::new(PACK_HEADER_LEN, last_used, Some(Arc::new(file))),
        );
        state.total += PACK_HEADER_LEN;
        state.open = Some(seq);
        Ok(seq)
    }

    /// Chunks stored by [`DiskStore::put`] whose pack is not yet committed.
    pub fn pending(&self) -> usize {
        self.state()
            .packs
            .values()
            .filter(|pack| !pack.committed)
            .map(|pack| pack.records)
            .sum()
    }

    /// Sealed packs waiting for [`DiskStore::commit_some`].
    pub fn sealed(&self) -> usize {
        self.state().queue.len()
    }

    /// Commits up to `max` sealed packs, oldest first: fdatasync, then rename from `tmp/` to
    /// `packs/`. Returns how many it committed (0, cheaply, when no pack is sealed). Safe to run
    /// on several threads at once; each pack is committed by exactly one. A pack whose commit
    /// fails is dropped from the store with its chunks and the error returned.
    pub fn commit_some(&self, max: usize) -> Result<usize, StoreError> {
        let mut done = 0;
        while done < max {
            let (seq, file, cut, discard) = {
                let mut state = self.state();
                let Some(seq) = state.queue.pop_front() else {
                    break;
                };
                state.committing += 1;
                while state.packs.get(&seq).is_some_and(|pack| pack.writers > 0) {
                    state = self.wait(state);
                }
                let Some(pack) = state.packs.get(&seq) else {
                    state.committing -= 1;
                    continue;
                };
                let cut = pack.broken_at;
                if let Some(at) = cut {
                    state.cut_pack(seq, at);
                }
                let discard = state.live_ids(seq).is_empty();
                let file = state.packs[&seq]
                    .file
                    .clone()
                    .expect("uncommitted pack is open");
                (seq, file, cut, discard)
            };
            let result = self.commit_pack(seq, &file, cut, discard);
            let mut state = self.state();
            state.committing -= 1;
            match result {
                Ok(Committed::Installed) => {
                    if let Some(pack) = state.packs.get_mut(&seq) {
                        pack.committed = true;
                        // Its mtime is its last write; set it from the last use at the next
                        // sync.
                        pack.touched = true;
                    }
                    state.packs_dirty = true;
                    done += 1;
                }
                Ok(Committed::Discarded) => {
                    state.drop_pack(seq);
                }
                Err(e) => {
                    state.drop_pack(seq);
                    drop(state);
                    let _ = fs::remove_file(self.tmp_path(seq));
                    self.changed.notify_all();
                    return Err(e);
                }
            }
            drop(state);
            self.changed.notify_all();
        }
        Ok(done)
    }

    fn commit_pack(
        &self,
        seq: u64,
        file: &File,
        cut: Option<u64>,
        discard: bool,
    ) -> Result<Committed, StoreError> {
        let temp = self.tmp_path(seq);
        if discard {
            remove_file(&temp)?;
            return Ok(Committed::Discarded);
        }
        let commit_err = |e| {
            classify(e, &temp, |source| StoreError::Commit {
                path: temp.clone(),
                source,
            })
        };
        if let Some(at) = cut {
            file.set_len(at).map_err(commit_err)?;
        }
        file.sync_data().map_err(commit_err)?;
        let target = self.pack_path(seq);
        fs::rename(&temp, &target).map_err(|e| {
            classify(e, &target, |source| StoreError::Install {
                from: temp.clone(),
                to: target.clone(),
                source,
            })
        })?;
        Ok(Committed::Installed)
    }

    /// An open handle on pack `seq`, opening (and caching) it if needed.
    fn handle(&self, state: &mut State, seq: u64) -> io::Result<Arc<File>> {
        let Some(pack) = state.packs.get(&seq) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        if let Some(file) = &pack.file {
            return Ok(file.clone());
        }
        let cached: Vec<u64> = state
            .packs
            .iter()
            .filter(|(_, pack)| pack.committed && pack.file.is_some())
            .map(|(&seq, _)| seq)
            .collect();
        if cached.len() >= MAX_OPEN_PACKS {
            let victim = cached[spread_index(state.clock, cached.len())];
            if let Some(pack) = state.packs.get_mut(&victim) {
                pack.file = None;
            }
        }
        let file = Arc::new(File::open(self.pack_path(seq))?);
        if let Some(pack) = state.packs.get_mut(&seq) {
            pack.file = Some(file.clone());
        }
        Ok(file)
    }

    /// The chunk's raw bytes, decoded and verified against `id`; marks it used.
    ///
    /// `Ok(None)` if the store does not hold it, including when its record turned out corrupt:
    /// the chunk is then dropped from the index (and a warning logged), so it can be fetched
    /// again; its space is reclaimed when its pack is evicted.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.load(id)?.map(|(raw, _)| raw))
    }

    /// The chunk as stored (encoding and payload), so the source side can re-send it without
    /// recompressing; marks it used. It is verified like [`DiskStore::get`] before being
    /// returned, so a corrupt record is never sent.
    pub fn get_encoded(&self, id: &ChunkId) -> Result<Option<Encoded>, StoreError> {
        Ok(self.load(id)?.map(|(_, encoded)| encoded))
    }

    fn load(&self, id: &ChunkId) -> Result<Option<(Vec<u8>, Encoded)>, StoreError> {
        let (loc, file, path) = {
            let mut state = self.state();
            let Some(loc) = state.index.get(id).copied() else {
                return Ok(None);
            };
            let path = self.current_path(&state, loc.pack);
            match self.handle(&mut state, loc.pack) {
                Ok(file) => (loc, file, path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(chunk = %id, path = %path.display(), "pack deleted behind the store's back");
                    state.drop_pack(loc.pack);
                    return Ok(None);
                }
                Err(source) => {
                    return Err(StoreError::Read {
                        id: *id,
                        path,
                        source,
                    })
                }
            }
        };
        let mut record = vec![0u8; RECORD_HEADER_LEN + loc.payload_len as usize];
        let reason = match file.read_exact_at(&mut record, loc.offset) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "record cut short".to_string(),
            Err(source) => {
                return Err(StoreError::Read {
                    id: *id,
                    path,
                    source,
                })
            }
            Ok(()) => match parse_record_header(&record) {
                None => "bad record header".to_string(),
                Some(h) if h.id != *id || h.payload_len != loc.payload_len => {
                    "record header names another chunk".to_string()
                }
                Some(h) => {
                    let payload = record.split_off(RECORD_HEADER_LEN);
                    match decode_verified(id, h.raw_len, h.encoding, &payload) {
                        Ok(raw) => {
                            self.state().mark_used(id);
                            let encoded = Encoded {
                                encoding: h.encoding,
                                payload,
                            };
                            return Ok(Some((raw, encoded)));
                        }
                        Err(e) => e.to_string(),
                    }
                }
            },
        };
        tracing::warn!(chunk = %id, path = %path.display(), offset = loc.offset, %reason, "dropping corrupt chunk");
        let mut state = self.state();
        if state.index.get(id) == Some(&loc) {
            state.index.remove(id);
        }
        Ok(None)
    }

    /// Marks a chunk used: its pack becomes the last candidate for eviction. The pack's mtime,
    /// which carries the order across a restart, is set at the next [`DiskStore::sync`] or
    /// [`DiskStore::evict_to_cap`].
    pub fn touch(&self, id: &ChunkId) {
        self.state().mark_used(id);
    }

    /// Sets the mtime of committed packs used since it was last set, in order of last use, so
    /// least-recently-used order survives a restart. Best effort: failures are only logged.
    fn stamp_mtimes(&self) {
        let stamps: Vec<(u64, SystemTime, Option<Arc<File>>)> = {
            let mut state = self.state();
            let mut touched: Vec<(u64, u64)> = state
                .packs
                .iter()
                .filter(|(_, pack)| pack.committed && pack.touched)
                .map(|(&seq, pack)| (pack.last_used, seq))
                .collect();
            touched.sort_unstable();
            touched
                .into_iter()
                .map(|(_, seq)| {
                    let mtime = state.next_mtime();
                    let pack = state.packs.get_mut(&seq).expect("listed above");
                    pack.touched = false;
                    (seq, mtime, pack.file.clone())
                })
                .collect()
        };
        for (seq, mtime, file) in stamps {
            let path = self.pack_path(seq);
            let result = match file {
                Some(file) => file.set_modified(mtime),
                None => File::open(&path).and_then(|f| f.set_modified(mtime)),
            };
            match result {
                Ok(()) => {}
                // Evicted meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "setting pack mtime")
                }
            }
        }
    }

    /// Seals the open pack, commits every sealed pack (waiting for appends and commits running
    /// on other threads), then flushes `packs/` so every chunk put before the call survives a
    /// crash. Also records the packs' use order in their mtimes. Call before the process exits,
    /// or chunks still pending are lost.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.state().seal_open();
        loop {
            self.commit_some(usize::MAX)?;
            let mut state = self.state();
            while state.committing > 0 {
                state = self.wait(state);
            }
            if state.queue.is_empty() {
                break;
            }
        }
        self.stamp_mtimes();
        let dirty = std::mem::take(&mut self.state().packs_dirty);
        if dirty {
            if let Err(e) = sync_dir(&self.packs_dir) {
                // Not flushed: try again at the next call.
                self.state().packs_dirty = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes least-recently-used committed packs, skipping those holding a chunk `keep` says
    /// to keep, until the store's total size is at most its cap. Does nothing without a cap.
    /// Eviction is per pack: all chunks of a pack go together.
    ///
    /// `keep` is called without the store's lock held, so it may use the store. A pack used
    /// while eviction runs is spared.
    pub fn evict_to_cap(&self, keep: &dyn Fn(&ChunkId) -> bool) -> Result<EvictStats, StoreError> {
        let mut stats = EvictStats::default();
        let Some(cap) = self.cap else {
            self.stamp_mtimes();
            stats.remaining_bytes = self.bytes();
            return Ok(stats);
        };
        let mut candidates: Vec<(u64, u64, Vec<ChunkId>)> = {
            let state = self.state();
            if state.total <= cap {
                stats.remaining_bytes = state.total;
                drop(state);
                self.stamp_mtimes();
                return Ok(stats);
            }
            state
                .packs
                .iter()
                .filter(|(_, pack)| pack.committed)
                .map(|(&seq, pack)| (pack.last_used, seq, state.live_ids(seq)))
                .collect()
        };
        candidates.sort_unstable_by_key(|&(last_used, seq, _)| (last_used, seq));
        for (last_used, seq, ids) in candidates {
            if self.bytes() <= cap {
                break;
            }
            if ids.iter().any(keep) {
                stats.kept += 1;
                continue;
            }
            let mut state = self.state();
            match state.packs.get(&seq) {
                // Still there and not used since the snapshot.
                Some(pack) if pack.last_used == last_used => {}
                _ => continue,
            }
            // Deleting under the lock keeps the index and the files in step.
            remove_file(&self.pack_path(seq))?;
            let (removed, size) = state.drop_pack(seq);
            stats.removed += removed;
            stats.freed_bytes += size;
        }
        self.stamp_mtimes();
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

    /// Total size of the pack files, committed or not (headers and dead records included): the
    /// quantity the cap bounds.
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

/// A cheap pseudo-random index below `len` (which handle to close): no need for quality.
fn spread_index(seed: u64, len: usize) -> usize {
    (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % len
}

/// Refuses encodings that cannot be a chunk of `raw_len` bytes (the store's reader would
/// reject them as corrupt anyway).
fn check_encoded(
    id: &ChunkId,
    raw_len: u32,
    encoding: Encoding,
    payload: &[u8],
) -> Result<(), StoreError> {
    let reason = if raw_len > MAX_CHUNK_LEN {
        format!("raw length {raw_len} is over the {MAX_CHUNK_LEN}-byte limit")
    } else if encoding == Encoding::Raw && payload.len() != raw_len as usize {
        format!(
            "raw payload of {} bytes for a declared {raw_len}",
            payload.len()
        )
    } else if payload.len() > raw_len as usize {
        format!(
            "compressed payload of {} bytes is longer than the {raw_len}-byte chunk",
            payload.len()
        )
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidChunk { id: *id, reason })
}

/// Deletes everything in `tmp/`: only packs never committed are left there.
fn clear_tmp(tmp_dir: &Path) -> Result<(), StoreError> {
    let scan_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Scan { path, source }
    };
    for entry in fs::read_dir(tmp_dir).map_err(scan_err(tmp_dir))? {
        let entry = entry.map_err(scan_err(tmp_dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(scan_err(&path))?;
        remove_entry(&path, kind.is_dir())?;
    }
    Ok(())
}

/// A committed pack found at open.
#[derive(Debug)]
struct ScannedPack {
    seq: u64,
    mtime: SystemTime,
    /// File length, including any garbled tail.
    size: u64,
    /// Its valid records, in file order.
    records: Vec<(ChunkId, Loc)>,
}

/// Lists the packs under `packs/`, fixing permissions and deleting anything that is not a
/// pack with at least one valid record.
fn scan_packs(packs_dir: &Path) -> Result<Vec<ScannedPack>, StoreError> {
    let scan_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Scan { path, source }
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(packs_dir).map_err(scan_err(packs_dir))? {
        let entry = entry.map_err(scan_err(packs_dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(scan_err(&path))?;
        let seq = entry.file_name().to_str().and_then(parse_pack_name);
        let Some(seq) = seq.filter(|_| kind.is_file()) else {
            tracing::warn!(path = %path.display(), "deleting stray entry in chunk store");
            remove_entry(&path, kind.is_dir())?;
            continue;
        };
        let meta = entry.metadata().map_err(scan_err(&path))?;
        if meta.permissions().mode() & 0o7777 != FILE_MODE {
            fs::set_permissions(&path, Permissions::from_mode(FILE_MODE))
                .map_err(scan_err(&path))?;
        }
        let file = File::open(&path).map_err(scan_err(&path))?;
        let size = meta.len();
        let records = scan_records(&file, size, seq).map_err(scan_err(&path))?;
        let Some(records) = records else {
            tracing::warn!(path = %path.display(), "deleting a file with no pack header in chunk store");
            remove_file(&path)?;
            continue;
        };
        if records.is_empty() {
            tracing::warn!(path = %path.display(), "deleting a pack with no valid record");
            remove_file(&path)?;
            continue;
        }
        let mtime = meta.modified().map_err(scan_err(&path))?;
        found.push(ScannedPack {
            seq,
            mtime,
            size,
            records,
        });
    }
    Ok(found)
}

/// Reads the record headers of a pack `size` bytes long, seeking over payloads. `None` if it
/// has no pack header; otherwise its valid records, stopping (with a warning) at a garbled or
/// truncated tail.
fn scan_records(file: &File, size: u64, seq: u64) -> io::Result<Option<Vec<(ChunkId, Loc)>>> {
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    if size < PACK_HEADER_LEN {
        return Ok(None);
    }
    file.read_exact_at(&mut header, 0)?;
    if header != pack_header() {
        return Ok(None);
    }
    let mut records = Vec::new();
    let mut offset = PACK_HEADER_LEN;
    let mut h = [0u8; RECORD_HEADER_LEN];
    while offset < size {
        if size - offset < RECORD_HEADER_LEN as u64 {
            break;
        }
        file.read_exact_at(&mut h, offset)?;
        let Some(parsed) = parse_record_header(&h) else {
            break;
        };
        let end = offset + RECORD_HEADER_LEN as u64 + u64::from(parsed.payload_len);
        if end > size {
            break;
        }
        records.push((
            parsed.id,
            Loc {
                pack: seq,
                offset,
                payload_len: parsed.payload_len,
            },
        ));
        offset = end;
    }
    if offset < size {
        tracing::warn!(
            pack = %pack_name(seq),
            valid = offset,
            size,
            "pack has a garbled or truncated tail; indexing its valid records only"
        );
    }
    Ok(Some(records))
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

    /// Size on disk of a chunk's record.
    fn record_len(encoded: &Encoded) -> u64 {
        (RECORD_HEADER_LEN + encoded.payload.len()) as u64
    }

    /// Puts and commits at once, as the tests of durable behaviour need: one pack per chunk.
    fn put_now(store: &DiskStore, id: &ChunkId, len: u32, encoded: &Encoded) -> bool {
        let stored = store.put(id, len, encoded).unwrap();
        store.sync().unwrap();
        stored
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn files_in(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    /// The only file in `dir`.
    fn only_file(dir: &Path) -> PathBuf {
        let files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.into_iter().next().unwrap()
    }

    /// The pack holding `id` and the record's offset in it.
    fn located(store: &DiskStore, id: &ChunkId) -> (PathBuf, u64) {
        let state = store.state();
        let loc = state.index[id];
        (store.current_path(&state, loc.pack), loc.offset)
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
        assert!(store.put(&id, len, &encoded).unwrap());
        assert!(store.contains(&id));
        assert!(
            !store.put(&id, len, &encoded).unwrap(),
            "second put is a no-op"
        );
        assert_eq!(store.len(), 1);
        assert_eq!(store.bytes(), PACK_HEADER_LEN + record_len(&encoded));
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
        assert_eq!(store.get_encoded(&id).unwrap().unwrap(), encoded);

        let (id2, len2, encoded2, raw2) = chunk(2, 20_000, false);
        assert_eq!(encoded2.encoding, Encoding::Raw);
        assert!(store.put(&id2, len2, &encoded2).unwrap());
        assert_eq!(store.get(&id2).unwrap().unwrap(), raw2);
        assert_eq!(
            store.bytes(),
            PACK_HEADER_LEN + record_len(&encoded) + record_len(&encoded2),
            "both in one pack"
        );
        store.sync().unwrap();
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
        assert_eq!(files_in(&dir.path().join("packs")), 1);
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..20)
            .map(|i| chunk(i, 5_000 + i as usize, i % 2 == 0))
            .collect();
        let bytes = {
            let store = DiskStore::open_with(dir.path(), None, 20_000).unwrap();
            for (id, len, encoded, _) in &chunks {
                store.put(id, *len, encoded).unwrap();
            }
            store.sync().unwrap();
            assert!(files_in(&dir.path().join("packs")) > 1);
            store.bytes()
        };
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), chunks.len());
        assert_eq!(store.bytes(), bytes);
        for (id, _, _, raw) in &chunks {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
        // New packs do not reuse the names of existing ones.
        let (id, len, enc, raw) = chunk(99, 5_000, true);
        put_now(&store, &id, len, &enc);
        drop(store);
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), chunks.len() + 1);
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
    }

    #[test]
    fn permissions_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        let store = DiskStore::open(&root, None).unwrap();
        let (id, len, encoded, _) = chunk(3, 1000, true);
        store.put(&id, len, &encoded).unwrap();
        assert_eq!(mode(&root), 0o700, "loose root is tightened");
        assert_eq!(mode(&root.join("packs")), 0o700);
        assert_eq!(mode(&root.join("tmp")), 0o700);
        assert_eq!(mode(&only_file(&root.join("tmp"))), 0o600, "open pack");
        store.sync().unwrap();
        let pack = only_file(&root.join("packs"));
        assert_eq!(mode(&pack), 0o600);

        // Loosened behind the store's back: tightened again at the next open.
        fs::set_permissions(&pack, Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.join("packs"), Permissions::from_mode(0o755)).unwrap();
        drop(store);
        let store = DiskStore::open(&root, None).unwrap();
        assert_eq!(mode(&root.join("packs")), 0o700);
        assert_eq!(mode(&pack), 0o600);
        assert!(store.contains(&id));
    }

    #[test]
    fn a_pending_chunk_is_readable_and_a_crash_before_commit_loses_it_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, encoded, raw) = chunk(11, 40_000, true);
        let (id2, len2, encoded2, _) = chunk(12, 40_000, false);
        {
            let store = DiskStore::open_with(dir.path(), None, 1).unwrap();
            assert!(store.put(&id, len, &encoded).unwrap());
            assert!(store.put(&id2, len2, &encoded2).unwrap());
            assert_eq!(store.pending(), 2);
            assert!(store.contains(&id));
            assert_eq!(
                store.get(&id).unwrap().unwrap(),
                raw,
                "readable before its commit"
            );
            assert_eq!(files_in(&dir.path().join("tmp")), 2, "two sealed packs");
            assert_eq!(
                files_in(&dir.path().join("packs")),
                0,
                "no final name before fdatasync"
            );
            // "Crash": the store goes away with its packs uncommitted.
        }
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert!(
            !store.contains(&id) && !store.contains(&id2),
            "an uncommitted chunk is gone, not corrupt"
        );
        assert_eq!(store.bytes(), 0);
        assert_eq!(files_in(&dir.path().join("tmp")), 0, "leftovers removed");
        assert!(put_now(&store, &id, len, &encoded));
        assert_eq!(files_in(&dir.path().join("packs")), 1);
        assert_eq!(store.pending(), 0);
        assert_eq!(store.get(&id).unwrap().unwrap(), raw);
    }

    #[test]
    fn commits_from_several_threads_each_commit_once() {
        let dir = tempfile::tempdir().unwrap();
        // About 4 chunks per pack.
        let store = DiskStore::open_with(dir.path(), None, 10_000).unwrap();
        let chunks: Vec<_> = (0..64).map(|i| chunk(100 + i, 3000, i % 2 == 0)).collect();
        for (id, len, enc, _) in &chunks {
            store.put(id, *len, enc).unwrap();
        }
        let sealed = store.state().queue.len();
        assert!(sealed > 4, "{sealed}");
        let committed: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| store.commit_some(usize::MAX).unwrap()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(committed, sealed);
        assert_eq!(files_in(&dir.path().join("packs")), sealed);
        assert_eq!(store.commit_some(1).unwrap(), 0, "nothing sealed left");
        store.sync().unwrap();
        assert_eq!(store.pending(), 0);
        for (id, _, _, raw) in &chunks {
            assert_eq!(&store.get(id).unwrap().unwrap(), raw);
        }
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn open_deletes_stray_names_and_a_legacy_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, encoded, _) = chunk(5, 2000, true);
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            put_now(&store, &id, len, &encoded);
        }
        let packs = dir.path().join("packs");
        let strays = [
            packs.join("junk"),
            packs.join("0000000000000000.pack.tmp"),
            packs.join("00000000000000AB.pack"),
            packs.join("00000000000000ab"),
            // A pack name with foreign contents.
            packs.join("00000000000000cd.pack"),
            // A pack header and nothing valid after it.
            packs.join("00000000000000ce.pack"),
        ];
        for stray in &strays[..5] {
            fs::write(stray, b"CKR1garbage").unwrap();
        }
        fs::write(&strays[5], [&pack_header()[..], b"CKR1"].concat()).unwrap();
        fs::create_dir(packs.join("subdir")).unwrap();
        let legacy = dir.path().join("chunks/ab");
        fs::create_dir_all(&legacy).unwrap();
        fs::write(legacy.join("x"), b"CKS1").unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.contains(&id));
        for stray in &strays {
            assert!(!stray.exists(), "{} survived", stray.display());
        }
        assert_eq!(files_in(&packs), 1);
        assert!(!dir.path().join("chunks").exists());
    }

    #[test]
    fn a_garbled_tail_keeps_the_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..4).map(|i| chunk(400 + i, 8000, i % 2 == 0)).collect();
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            for (id, len, enc, _) in &chunks {
                store.put(id, *len, enc).unwrap();
            }
            store.sync().unwrap();
        }
        let pack = only_file(&dir.path().join("packs"));
        let full = fs::metadata(&pack).unwrap().len();
        // Cut the last record short.
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        file.set_len(full - 10).unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), 3);
        assert_eq!(store.bytes(), full - 10);
        for (id, _, _, raw) in &chunks[..3] {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
        assert!(!store.contains(&chunks[3].0));
        drop(store);
        // A garbled record header in the middle: the records before it survive.
        let (_, offset) = {
            let store = DiskStore::open(dir.path(), None).unwrap();
            located(&store, &chunks[1].0)
        };
        let mut bytes = fs::read(&pack).unwrap();
        bytes[offset as usize] ^= 0x55;
        fs::write(&pack, bytes).unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.contains(&chunks[0].0));
    }

    #[test]
    fn corrupt_record_is_dropped_and_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (a, a_len, a_enc, _) = chunk(6, 40_000, true);
        let (b, b_len, b_enc, _) = chunk(7, 40_000, false);
        let (c, c_len, c_enc, _) = chunk(8, 40_000, true);
        let (d, d_len, d_enc, d_raw) = chunk(9, 40_000, false);
        for (id, len, enc) in [
            (&a, a_len, &a_enc),
            (&b, b_len, &b_enc),
            (&c, c_len, &c_enc),
            (&d, d_len, &d_enc),
        ] {
            store.put(id, len, enc).unwrap();
        }
        store.sync().unwrap();
        let bytes_before = store.bytes();
        // a: payload byte flipped; b: raw byte flipped; c: record magic damaged.
        for (id, pos) in [
            (&a, RECORD_HEADER_LEN + 10),
            (&b, RECORD_HEADER_LEN + 1000),
            (&c, 0),
        ] {
            let (path, offset) = located(&store, id);
            assert!(path.starts_with(dir.path().join("packs")));
            let mut bytes = fs::read(&path).unwrap();
            bytes[offset as usize + pos] ^= 0x55;
            fs::write(&path, bytes).unwrap();
        }
        assert_eq!(store.get(&a).unwrap(), None);
        assert_eq!(store.get_encoded(&b).unwrap(), None);
        assert_eq!(store.get(&c).unwrap(), None);
        for id in [&a, &b, &c] {
            assert!(!store.contains(id));
        }
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.get(&d).unwrap().unwrap(),
            d_raw,
            "its neighbour is fine"
        );
        assert_eq!(
            store.bytes(),
            bytes_before,
            "the space stays until eviction"
        );
        // It can be fetched and stored again.
        assert!(put_now(&store, &a, a_len, &a_enc));
        assert!(store.get(&a).unwrap().is_some());
    }

    #[test]
    fn pack_deleted_behind_the_store_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (id, len, enc, _) = chunk(9, 3000, true);
        {
            let store = DiskStore::open(dir.path(), None).unwrap();
            put_now(&store, &id, len, &enc);
        }
        // A fresh store has no handle open on the pack yet (an open one would still read it).
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert!(store.contains(&id));
        fs::remove_file(only_file(&dir.path().join("packs"))).unwrap();
        assert_eq!(store.get(&id).unwrap(), None);
        assert!(!store.contains(&id));
        assert_eq!(store.bytes(), 0);
    }

    /// Five committed packs of one chunk each, oldest first; returns the size of one pack.
    fn sized_store(dir: &Path, cap: Option<u64>) -> (DiskStore, Vec<ChunkId>, u64) {
        let store = DiskStore::open(dir, cap).unwrap();
        let mut ids = Vec::new();
        let mut size = 0;
        for i in 0..5 {
            // Random data stays raw: every pack has the same size.
            let (id, len, enc, _) = chunk(100 + i, 10_000, false);
            size = PACK_HEADER_LEN + record_len(&enc);
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
        assert_eq!(files_in(&dir.path().join("packs")), 5);
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
        assert_eq!(files_in(&dir.path().join("packs")), 3);
        // Within the cap: nothing more to do.
        assert_eq!(store.evict_to_cap(&|_| false).unwrap().removed, 0);
    }

    #[test]
    fn eviction_is_per_pack() {
        let dir = tempfile::tempdir().unwrap();
        // Two 10_000-byte chunks per pack.
        let store = DiskStore::open_with(dir.path(), Some(1), 15_000).unwrap();
        let chunks: Vec<_> = (0..6).map(|i| chunk(500 + i, 10_000, false)).collect();
        for (id, len, enc, _) in &chunks {
            store.put(id, *len, enc).unwrap();
        }
        store.sync().unwrap();
        assert_eq!(files_in(&dir.path().join("packs")), 3);
        let pack_size = PACK_HEADER_LEN + 2 * record_len(&chunks[0].2);
        // The first pack is used through its second chunk; the second pack holds a needed one.
        store.touch(&chunks[1].0);
        let needed = chunks[2].0;
        let stats = store.evict_to_cap(&|id| *id == needed).unwrap();
        assert_eq!(stats.removed, 4, "two packs of two chunks");
        assert_eq!(stats.freed_bytes, 2 * pack_size);
        assert_eq!(stats.kept, 1);
        assert_eq!(stats.remaining_bytes, pack_size);
        let alive: Vec<bool> = chunks.iter().map(|(id, ..)| store.contains(id)).collect();
        assert_eq!(alive, [false, false, true, true, false, false]);
        assert_eq!(files_in(&dir.path().join("packs")), 1);
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
    fn uncommitted_packs_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), Some(1)).unwrap();
        let (id, len, enc, _) = chunk(600, 10_000, false);
        store.put(&id, len, &enc).unwrap();
        let stats = store.evict_to_cap(&|_| false).unwrap();
        assert_eq!(stats.removed, 0);
        assert!(store.contains(&id));
        store.sync().unwrap();
        assert_eq!(store.evict_to_cap(&|_| false).unwrap().removed, 1);
        assert!(store.is_empty());
    }

    #[test]
    fn lru_order_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, size) = {
            let (store, ids, size) = sized_store(dir.path(), None);
            store.touch(&ids[1]);
            store.get(&ids[0]).unwrap().unwrap();
            // The order reaches the packs' mtimes at the next sync (or eviction).
            store.sync().unwrap();
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
    fn failed_install_drops_the_pack_and_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (id, len, enc, _) = chunk(10, 5000, true);
        assert!(
            store.put(&id, len, &enc).unwrap(),
            "indexed at once, in the open pack"
        );
        // A directory squatting the pack's final name makes the rename fail.
        let seq = store.state().index[&id].pack;
        fs::create_dir_all(store.pack_path(seq).join("squat")).unwrap();
        let err = store.sync().unwrap_err();
        assert!(matches!(err, StoreError::Install { .. }), "{err}");
        assert!(err.to_string().contains(&pack_name(seq)), "{err}");
        assert!(!store.contains(&id));
        assert_eq!(store.bytes(), 0);
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
        // The next put starts a new pack.
        assert!(put_now(&store, &id, len, &enc));
        assert!(store.contains(&id));
    }

    #[test]
    fn a_failed_append_is_cut_off_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), None).unwrap();
        let (a, a_len, a_enc, a_raw) = chunk(20, 5000, true);
        let (b, b_len, b_enc, _) = chunk(21, 5000, false);
        store.put(&a, a_len, &a_enc).unwrap();
        store.put(&b, b_len, &b_enc).unwrap();
        // Pretend b's append failed.
        {
            let mut state = store.state();
            let loc = state.index.remove(&b).unwrap();
            state.packs.get_mut(&loc.pack).unwrap().broken_at = Some(loc.offset);
        }
        store.sync().unwrap();
        let pack = only_file(&dir.path().join("packs"));
        let expected = PACK_HEADER_LEN + record_len(&a_enc);
        assert_eq!(fs::metadata(&pack).unwrap().len(), expected);
        assert_eq!(store.bytes(), expected);
        drop(store);
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.get(&a).unwrap().unwrap(), a_raw);
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
        let err = classify(io::Error::from_raw_os_error(libc::EDQUOT), path, |source| {
            StoreError::Remove {
                path: path.to_path_buf(),
                source,
            }
        });
        assert!(matches!(&err, StoreError::NoSpace { .. }));
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
        // A few chunks per pack, so packs are sealed and committed while others append.
        let store = DiskStore::open_with(dir.path(), None, 12_000).unwrap();
        let chunks: Vec<_> = (0..32).map(|i| chunk(300 + i, 4000, i % 3 == 0)).collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (store, chunks) = (&store, &chunks);
                s.spawn(move || {
                    for (i, (id, len, enc, raw)) in chunks.iter().enumerate() {
                        store.put(id, *len, enc).unwrap();
                        assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
                        if (i + t) % 5 == 0 {
                            store.commit_some(1).unwrap();
                        }
                    }
                });
            }
        });
        store.sync().unwrap();
        assert_eq!(store.len(), chunks.len());
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
        for (id, _, _, raw) in &chunks {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
        // Duplicate records from racing puts count as space but never as chunks.
        let packs_on_disk: u64 = fs::read_dir(dir.path().join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(store.bytes(), packs_on_disk);
        let bytes = store.bytes();
        drop(store);
        let store = DiskStore::open(dir.path(), None).unwrap();
        assert_eq!(store.bytes(), bytes);
        assert_eq!(store.len(), chunks.len());
        for (id, _, _, raw) in &chunks {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(raw));
        }
    }
}
