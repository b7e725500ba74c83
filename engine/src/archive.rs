//! Checkpoint archives: the uncompressed tar that `podman container checkpoint --export` and the
//! kubelet checkpoint API write. [`scan`] walks one entry by entry, never holding more than one
//! entry's header in memory, and refuses anything a hostile archive could use against the node
//! that unpacks it: absolute paths, `..`, links that leave the archive, device and fifo entries,
//! oversized entries, non-UTF-8 names, a truncated stream, or a missing `config.dump`/`spec.dump`.
//! [`extract`] unpacks a validated archive into a fresh directory (dirs 0700, files at most 0600)
//! without ever following a symlink while it writes.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

/// Files every checkpoint archive holds at its root; restore is impossible without them.
pub const REQUIRED_FILES: [&str; 2] = ["config.dump", "spec.dump"];

/// Bounds on what an archive may hold. The defaults fit any real container and stop an archive
/// built to exhaust the disk or the inode table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest size of one entry, in bytes (a memory dump of one process is one entry).
    pub max_entry_bytes: u64,
    /// Largest number of entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entry_bytes: 64 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// Why an archive was refused. Paths are as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive could not be opened or read, for a reason other than ending early.
    #[error("reading the archive failed: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside an entry or without the tar end-of-archive marker.
    #[error("the archive is truncated: {context}; copy it again")]
    Truncated {
        /// Where it ended: inside which entry, or after how many entries.
        context: String,
    },
    /// A header does not parse as tar (bad checksum, bad number field).
    #[error("entry {index} is not a valid tar header: {reason}")]
    Malformed {
        /// 0-based position of the entry.
        index: u64,
        /// What the tar reader said.
        reason: String,
    },
    /// An entry name is not valid UTF-8.
    #[error("entry name {lossy:?} is not valid UTF-8")]
    NonUtf8Name {
        /// The name with invalid bytes replaced.
        lossy: String,
    },
    /// An entry name starts at `/`.
    #[error("entry {path:?} has an absolute path")]
    AbsolutePath {
        /// The entry name.
        path: String,
    },
    /// An entry name has a `..` component.
    #[error("entry {path:?} has a '..' component")]
    ParentComponent {
        /// The entry name.
        path: String,
    },
    /// A symlink or hard link points at an absolute path.
    #[error("link {path:?} points to the absolute path {target:?}")]
    AbsoluteLink {
        /// The link's name.
        path: String,
        /// Where it points.
        target: String,
    },
    /// A symlink (resolved from its directory) or hard link (resolved from the archive root)
    /// points outside the archive.
    #[error("link {path:?} points to {target:?}, outside the archive")]
    LinkEscapes {
        /// The link's name.
        path: String,
        /// Where it points.
        target: String,
    },
    /// An entry, or a link's target, goes through a symlink that is itself in the archive, so
    /// where it lands cannot be decided from names alone.
    #[error("{path:?} goes through the symlink {symlink:?} in the archive")]
    ThroughSymlink {
        /// The entry (or link target) that does.
        path: String,
        /// The symlink on its way.
        symlink: String,
    },
    /// A character or block device, a fifo, or another special entry.
    #[error("entry {path:?} is a {kind}, which a checkpoint archive never holds")]
    SpecialFile {
        /// The entry name.
        path: String,
        /// "character device", "block device", "fifo", or the tar type byte.
        kind: String,
    },
    /// One entry is larger than [`Limits::max_entry_bytes`].
    #[error("entry {path:?} is {size} bytes, over the limit of {limit} bytes")]
    EntryTooLarge {
        /// The entry name.
        path: String,
        /// Its size from the header.
        size: u64,
        /// The configured bound.
        limit: u64,
    },
    /// More entries than [`Limits::max_entries`].
    #[error("the archive has more than {limit} entries")]
    TooManyEntries {
        /// The configured bound.
        limit: u64,
    },
    /// The same name appears twice (a later copy could replace a checked file).
    #[error("entry {path:?} appears twice")]
    Duplicate {
        /// The entry name.
        path: String,
    },
    /// `config.dump` or `spec.dump` is not a regular file at the archive root.
    #[error("the archive has no {name}: not a container checkpoint")]
    Missing {
        /// The missing file.
        name: &'static str,
    },
    /// Extraction: the target exists and is not an empty directory.
    #[error("extraction target {0} exists and is not an empty directory")]
    TargetNotEmpty(PathBuf),
    /// Extraction: writing a file or directory failed.
    #[error("writing {path} failed: {source}")]
    Write {
        /// The path on disk.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What kind of entry, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (also GNU sparse and contiguous files).
    File,
    /// A directory.
    Dir,
    /// A symlink whose target stays in the archive.
    Symlink,
    /// A hard link to another entry of the archive.
    HardLink,
}

/// One validated entry, as [`scan`] hands it to its visitor.
#[derive(Debug, Clone, Copy)]
pub struct EntryInfo<'a> {
    /// Normalised relative path (`./` and trailing `/` removed).
    pub path: &'a str,
    /// What it is.
    pub kind: EntryKind,
    /// Data size in bytes (0 for directories and links).
    pub size: u64,
    /// Permission bits from the header.
    pub mode: u32,
    /// Modification time from the header, seconds since the epoch.
    pub mtime: u64,
    /// For links, the target as written.
    pub link_target: Option<&'a str>,
    /// Where the entry's data starts in the archive, in bytes.
    pub offset: u64,
}

/// What a validated archive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// Entries of every kind.
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks and hard links.
    pub links: u64,
    /// Sum of the regular files' sizes.
    pub content_bytes: u64,
    /// Bytes of tar read, up to and including the first block of the end-of-archive marker.
    pub archive_bytes: u64,
}

/// Reads `reader` as a checkpoint archive and checks every entry. Nothing is kept in memory
/// beyond one header and the names of symlinks.
pub fn validate(reader: impl Read, limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    scan(reader, limits, |_, _| Ok(()))
}

/// [`validate`] on a file, skipping entries' data rather than reading it (see [`scan_file`]).
pub fn validate_file(path: &Path, limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    scan_file(path, limits, |_, _| Ok(()))
}

/// Opens an archive file for [`scan`], buffered.
pub fn open(path: &Path) -> Result<BufReader<File>, ArchiveError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(256 << 10, f))
        .map_err(ArchiveError::Io)
}

/// Walks the archive, validating each entry before handing it to `visit` with a reader over its
/// data (`visit` may read part of it or none; the rest is skipped and counted). Errors `visit`
/// returns stop the walk as [`ArchiveError::Io`]. The checks that need the whole archive (required
/// files, links through symlinks) run at the end, so a visitor may have seen entries of an
/// archive that is refused in the end.
pub fn scan<R: Read>(
    reader: R,
    limits: &Limits,
    visit: impl FnMut(&EntryInfo<'_>, &mut dyn Read) -> io::Result<()>,
) -> Result<ArchiveSummary, ArchiveError> {
    let mut archive = tar::Archive::new(Counting::new(reader));
    let mut checker = Checker::new(*limits);
    let entries = archive.entries().map_err(ArchiveError::Io)?;
    let index = walk(entries, &mut checker, true, visit)?;
    finish(archive.into_inner(), checker, index)
}

/// [`scan`] of the archive file at `path`, except that the data the visitor leaves unread is
/// skipped by seeking, never read: most of a checkpoint is page images nobody needs to read
/// here, and an archive received with its page images as files of their own (see
/// [`crate::pages`]) holds holes there, which would cost fresh memory to read. A file cut
/// short is still refused: its end-of-archive marker is missing.
pub fn scan_file(
    path: &Path,
    limits: &Limits,
    visit: impl FnMut(&EntryInfo<'_>, &mut dyn Read) -> io::Result<()>,
) -> Result<ArchiveSummary, ArchiveError> {
    let mut archive = tar::Archive::new(Counting::new(open(path)?));
    let mut checker = Checker::new(*limits);
    let entries = archive.entries_with_seek().map_err(ArchiveError::Io)?;
    let index = walk(entries, &mut checker, false, visit)?;
    finish(archive.into_inner(), checker, index)
}

/// Checks and visits every entry; the number of entries. With `drain`, the data a visitor
/// leaves unread is read to its end, and an entry whose data ends early is refused.
fn walk<R: Read>(
    entries: tar::Entries<'_, Counting<R>>,
    checker: &mut Checker,
    drain: bool,
    mut visit: impl FnMut(&EntryInfo<'_>, &mut dyn Read) -> io::Result<()>,
) -> Result<u64, ArchiveError> {
    let mut index = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(e, index, None))?;
        let Some(info) = checker.check(&entry, index)? else {
            index += 1;
            continue;
        };
        let path = info.path.clone();
        let entry_info = info.as_info(entry.raw_file_position());
        let mut counted = CountingRead {
            inner: &mut entry,
            n: 0,
        };
        let result = visit(&entry_info, &mut counted).and_then(|()| match drain {
            true => io::copy(&mut counted, &mut io::sink()).map(drop),
            false => Ok(()),
        });
        let read = counted.n;
        result.map_err(|e| read_error(e, index, Some(&path)))?;
        if drain && read != entry_info.size {
            return Err(ArchiveError::Truncated {
                context: format!(
                    "entry {path:?} holds {read} of its {} bytes",
                    entry_info.size
                ),
            });
        }
        index += 1;
    }
    Ok(index)
}

/// The end-of-archive checks, once every entry was walked.
fn finish<R>(
    counting: Counting<R>,
    checker: Checker,
    index: u64,
) -> Result<ArchiveSummary, ArchiveError> {
    if counting.eof {
        return Err(ArchiveError::Truncated {
            context: format!("no end-of-archive marker after {index} entries"),
        });
    }
    checker.finish(counting.n)
}

/// Extracts `reader` into `target`, which must not exist or be an empty directory. It is created
/// 0700; every directory is 0700 and every file keeps at most its owner's read/write bits
/// (0600 or tighter): checkpoints hold process memory, secrets included. Parent directories
/// are made here, never through a symlink, and files open with `O_CREAT|O_EXCL|O_NOFOLLOW`.
/// On any error the target is removed again if this call created it, or emptied if it was.
pub fn extract(
    reader: impl Read,
    limits: &Limits,
    target: &Path,
) -> Result<ArchiveSummary, ArchiveError> {
    let write_err = |path: &Path, source| ArchiveError::Write {
        path: path.to_path_buf(),
        source,
    };
    let created = match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(target)
                .map_err(|e| write_err(target, e))?;
            true
        }
        Err(e) => return Err(write_err(target, e)),
        Ok(m) => {
            let empty = m.is_dir()
                && fs::read_dir(target)
                    .map_err(|e| write_err(target, e))?
                    .next()
                    .is_none();
            if !empty {
                return Err(ArchiveError::TargetNotEmpty(target.to_path_buf()));
            }
            fs::set_permissions(target, fs::Permissions::from_mode(0o700))
                .map_err(|e| write_err(target, e))?;
            false
        }
    };
    let mut write_failure = None;
    let result = scan(reader, limits, |info, data| {
        write_entry(target, info, data).inspect_err(|e| {
            write_failure = Some(ArchiveError::Write {
                path: target.join(info.path),
                source: io::Error::new(e.kind(), e.to_string()),
            });
        })
    });
    let result = match (result, write_failure) {
        (Err(_), Some(failure)) => Err(failure),
        (result, _) => result,
    };
    if result.is_err() {
        if created {
            let _ = fs::remove_dir_all(target);
        } else if let Ok(dir) = fs::read_dir(target) {
            for child in dir.flatten() {
                let p = child.path();
                let _ = match child.file_type() {
                    Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                    _ => fs::remove_file(&p),
                };
            }
        }
    }
    result
}

/// Writes one validated entry under `root`.
pub(crate) fn write_entry(
    root: &Path,
    info: &EntryInfo<'_>,
    data: &mut dyn Read,
) -> io::Result<()> {
    let dest = make_parents(root, info.path)?;
    match info.kind {
        EntryKind::Dir => match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dest.display()),
            )),
            Err(_) => fs::DirBuilder::new().mode(0o700).create(&dest),
        },
        EntryKind::File => {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(info.mode & 0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dest)?;
            io::copy(data, &mut file)?;
            file.flush()
        }
        EntryKind::Symlink => {
            std::os::unix::fs::symlink(info.link_target.unwrap_or_default(), &dest)
        }
        EntryKind::HardLink => {
            let source = root.join(normalise(info.link_target.unwrap_or_default()));
            // The source must be a file this extraction wrote: lstat, so a symlink is refused.
            let meta = fs::symlink_metadata(&source)?;
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("hard link {} targets a non-file", info.path),
                ));
            }
            fs::hard_link(&source, &dest)
        }
    }
}

/// Creates the directories above `rel` under `root` (0700), refusing any existing component
/// that is not a real directory, and returns the full path of `rel`.
fn make_parents(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    let mut parts = rel.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return Ok(dir.join(part));
        }
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o700).create(&dir)?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// Per-entry checks and the state the end-of-archive checks need.
#[derive(Debug)]
struct Checker {
    limits: Limits,
    summary: ArchiveSummary,
    /// Every name seen, with whether it is a directory (directories may repeat).
    seen: HashMap<String, EntryKind>,
    /// Links: name, and the directories their target's resolution passes through.
    links: Vec<(String, Vec<String>)>,
}

/// An entry that passed the per-entry checks.
#[derive(Debug)]
struct Checked {
    path: String,
    kind: EntryKind,
    size: u64,
    mode: u32,
    mtime: u64,
    target: Option<String>,
}

impl Checked {
    fn as_info(&self, offset: u64) -> EntryInfo<'_> {
        EntryInfo {
            path: &self.path,
            kind: self.kind,
            size: self.size,
            mode: self.mode,
            mtime: self.mtime,
            link_target: self.target.as_deref(),
            offset,
        }
    }
}

impl Checker {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            summary: ArchiveSummary::default(),
            seen: HashMap::new(),
            links: Vec::new(),
        }
    }

    /// Checks one entry; `None` for entries that carry no file (the root `./`, pax globals).
    fn check<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        index: u64,
    ) -> Result<Option<Checked>, ArchiveError> {
        if self.summary.entries >= self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let header = entry.header();
        let entry_type = header.entry_type();
        if entry_type == EntryType::XGlobalHeader {
            return Ok(None);
        }
        let raw = entry.path_bytes();
        let path = utf8(&raw)?;
        if path.starts_with('/') {
            return Err(ArchiveError::AbsolutePath { path });
        }
        let parts = components(&path);
        if parts.contains(&"..") {
            return Err(ArchiveError::ParentComponent { path });
        }
        let kind = match entry_type {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => EntryKind::File,
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => EntryKind::Symlink,
            EntryType::Link => EntryKind::HardLink,
            EntryType::Char => return Err(special(path, "character device")),
            EntryType::Block => return Err(special(path, "block device")),
            EntryType::Fifo => return Err(special(path, "fifo")),
            other => {
                let kind = format!("entry of tar type {:?}", other.as_byte() as char);
                return Err(special(path, &kind));
            }
        };
        let norm = parts.join("/");
        if norm.is_empty() {
            if kind == EntryKind::Dir {
                return Ok(None);
            }
            return Err(ArchiveError::Malformed {
                index,
                reason: format!("entry {path:?} has an empty name"),
            });
        }
        let size = entry.size();
        if size > self.limits.max_entry_bytes {
            return Err(ArchiveError::EntryTooLarge {
                path,
                size,
                limit: self.limits.max_entry_bytes,
            });
        }
        for (i, _) in norm.match_indices('/') {
            if self.seen.get(&norm[..i]) == Some(&EntryKind::Symlink) {
                return Err(ArchiveError::ThroughSymlink {
                    path,
                    symlink: norm[..i].to_string(),
                });
            }
        }
        match self.seen.get(&norm) {
            Some(EntryKind::Dir) if kind == EntryKind::Dir => {}
            Some(_) => return Err(ArchiveError::Duplicate { path }),
            None => {}
        }
        let target = match kind {
            EntryKind::Symlink | EntryKind::HardLink => {
                let raw = entry.link_name_bytes().unwrap_or_default();
                let target = utf8(&raw)?;
                let traversed = resolve_link(&norm, &target, kind).map_err(|absolute| {
                    if absolute {
                        ArchiveError::AbsoluteLink {
                            path: path.clone(),
                            target: target.clone(),
                        }
                    } else {
                        ArchiveError::LinkEscapes {
                            path: path.clone(),
                            target: target.clone(),
                        }
                    }
                })?;
                self.links.push((norm.clone(), traversed));
                Some(target)
            }
            _ => None,
        };
        self.seen.insert(norm.clone(), kind);
        self.summary.entries += 1;
        match kind {
            EntryKind::File => {
                self.summary.files += 1;
                self.summary.content_bytes += size;
            }
            EntryKind::Dir => self.summary.dirs += 1,
            _ => self.summary.links += 1,
        }
        Ok(Some(Checked {
            path: norm,
            kind,
            size: if kind == EntryKind::File { size } else { 0 },
            mode: header.mode().unwrap_or(0o600),
            mtime: header.mtime().unwrap_or(0),
            target,
        }))
    }

    /// The whole-archive checks: required files, and no entry or link target that passes
    /// through a symlink of the archive.
    fn finish(self, archive_bytes: u64) -> Result<ArchiveSummary, ArchiveError> {
        let symlink_at = |prefix: &str| self.seen.get(prefix) == Some(&EntryKind::Symlink);
        for path in self.seen.keys() {
            // Every directory above the entry: "a/b/c" → "a", "a/b".
            for (i, _) in path.match_indices('/') {
                if symlink_at(&path[..i]) {
                    return Err(ArchiveError::ThroughSymlink {
                        path: path.clone(),
                        symlink: path[..i].to_string(),
                    });
                }
            }
        }
        for (link, traversed) in &self.links {
            if let Some(dir) = traversed.iter().find(|d| symlink_at(d)) {
                return Err(ArchiveError::ThroughSymlink {
                    path: link.clone(),
                    symlink: dir.clone(),
                });
            }
        }
        for name in REQUIRED_FILES {
            if self.seen.get(name) != Some(&EntryKind::File) {
                return Err(ArchiveError::Missing { name });
            }
        }
        let mut summary = self.summary;
        summary.archive_bytes = archive_bytes;
        Ok(summary)
    }
}

/// Resolves a link target by name: symlinks from the link's directory, hard links from the
/// archive root (tar's convention). Returns the archive paths the walk passes through (every
/// one a component is looked up in); `Err(true)` for an absolute target, `Err(false)` for one
/// that climbs above the root. Resolving by name is right only if none of those paths is
/// itself a symlink (`s -> .` makes `s/..` the root's parent); [`Checker::finish`] checks that
/// once every entry is known.
fn resolve_link(link: &str, target: &str, kind: EntryKind) -> Result<Vec<String>, bool> {
    if target.starts_with('/') {
        return Err(true);
    }
    if target.is_empty() {
        return Err(false);
    }
    let mut stack: Vec<String> = Vec::new();
    if kind == EntryKind::Symlink {
        let dir = link.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        stack.extend(components(dir).into_iter().map(String::from));
    }
    let mut traversed = Vec::new();
    for part in components(target) {
        if !stack.is_empty() {
            traversed.push(stack.join("/"));
        }
        if part == ".." {
            if stack.pop().is_none() {
                return Err(false);
            }
        } else {
            stack.push(part.to_string());
        }
    }
    Ok(traversed)
}

/// Path components without empty and `.` parts.
fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect()
}

/// `./a//b/` → `a/b`.
fn normalise(path: &str) -> String {
    components(path).join("/")
}

fn utf8(raw: &[u8]) -> Result<String, ArchiveError> {
    std::str::from_utf8(raw)
        .map(str::to_owned)
        .map_err(|_| ArchiveError::NonUtf8Name {
            lossy: String::from_utf8_lossy(raw).into_owned(),
        })
}

fn special(path: String, kind: &str) -> ArchiveError {
    ArchiveError::SpecialFile {
        path,
        kind: kind.to_string(),
    }
}

/// Turns a read error into [`ArchiveError::Truncated`] when the stream ended early, else
/// [`ArchiveError::Malformed`] for tar's own complaints or [`ArchiveError::Io`].
fn read_error(e: io::Error, index: u64, path: Option<&str>) -> ArchiveError {
    let ended = e.kind() == io::ErrorKind::UnexpectedEof
        || e.to_string().contains("failed to read entire block")
        || e.to_string().contains("unexpected EOF");
    if ended {
        let context = match path {
            Some(p) => format!("the stream ends inside entry {p:?}"),
            None => format!("the stream ends inside the header of entry {index}"),
        };
        return ArchiveError::Truncated { context };
    }
    if e.kind() == io::ErrorKind::Other && path.is_none() {
        return ArchiveError::Malformed {
            index,
            reason: e.to_string(),
        };
    }
    ArchiveError::Io(e)
}

/// Counts the bytes read through it and remembers whether the source ran dry (EOF), which is
/// how a tar that stops without its end marker is told from a complete one.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    n: u64,
    eof: bool,
}

impl<R> Counting<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            n: 0,
            eof: false,
        }
    }
}

/// Seeking skips: the position becomes the count.
impl<R: io::Seek> io::Seek for Counting<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.n = self.inner.seek(pos)?;
        Ok(self.n)
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        self.n += n as u64;
        Ok(n)
    }
}

/// Counts the bytes of one entry's data, so a short entry is reported as truncation.
struct CountingRead<'a> {
    inner: &'a mut dyn Read,
    n: u64,
}

impl Read for CountingRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
