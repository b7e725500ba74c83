//! What a receiver writes: the output file, or the output with some ranges of the stream
//! written to files of their own.
//!
//! A checkpoint archive is a tar whose bulk is CRIU's page images. Podman restores an archive
//! by untarring it: a second full copy of the pages, and on a machine where fresh memory is
//! slow, the costliest step of a restore. A destination that knows where the page images lie
//! in the stream names those ranges as [`Piece`]s: the receiver writes each straight to a file
//! of its own and leaves its range in the output as a hole, so the output is still a tar of the
//! stream's length (its pieces read as zeros, at no cost in disk or memory) and the pages are
//! never copied again. Any file can be built over an earlier one (`reuse`): that file is renamed
//! to the partial name and rewritten in place, its zero runs punched out, so its pages are
//! reused rather than allocated anew; told what that file held ([`Held`]), the receiver does
//! not even rewrite the chunks that lie where they already lay. Every file is written under a
//! `.partial` name and renamed only once the whole stream is in and checked; a failed transfer
//! removes them all.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::quic::TransferError;
use crate::protocol::{Held, InPlace};

/// A range of the stream written to a file of its own instead of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the range's first byte in the stream.
    pub offset: u64,
    /// Length of the range, in bytes; more than 0.
    pub len: u64,
    /// The file that receives it (created 0600; its folder must exist).
    pub path: PathBuf,
    /// A file to build it over (see the module documentation); a missing one is ignored.
    pub reuse: Option<PathBuf>,
}

/// One file being written: the output (`start` 0, `len` `None`: the whole stream) or a piece.
#[derive(Debug)]
struct Target {
    start: u64,
    len: Option<u64>,
    path: PathBuf,
    partial: PathBuf,
    /// The partial file starts with an earlier file's bytes: zero runs must be punched out,
    /// and it is not truncated when a resumed connection starts over.
    overwrite: bool,
    /// That earlier file's name, when `overwrite`.
    built_over: Option<PathBuf>,
}

/// The files of one transfer, across the connections that carry it: named and checked once,
/// opened by each connection ([`Layout::open`]), renamed or removed at the end.
#[derive(Debug)]
pub(crate) struct Layout {
    /// The output first, then the pieces in stream order.
    targets: Vec<Target>,
}

impl Layout {
    /// The output `out` (built over `reuse` if given) and `pieces`, which must be in stream
    /// order, not overlap and not be empty. Renames each `reuse` file to its partial name.
    pub(crate) fn new(
        out: &Path,
        reuse: Option<&Path>,
        pieces: &[Piece],
    ) -> Result<Layout, TransferError> {
        let mut end = 0;
        for piece in pieces {
            if piece.len == 0 || piece.offset < end || piece.path == out {
                return Err(TransferError::Output {
                    path: piece.path.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "piece at {}+{} is empty, overlaps the one before (ending at {end}), \
                             or is the output itself",
                            piece.offset, piece.len
                        ),
                    ),
                });
            }
            end = piece.offset + piece.len;
        }
        let output = std::iter::once((0, None, out, reuse));
        let rest = pieces
            .iter()
            .map(|p| (p.offset, Some(p.len), p.path.as_path(), p.reuse.as_deref()));
        let targets = output
            .chain(rest)
            .map(|(start, len, path, reuse)| {
                let partial = partial_path(path);
                let overwrite = reuse.is_some_and(|base| build_over(base, &partial));
                Target {
                    start,
                    len,
                    path: path.to_path_buf(),
                    partial,
                    overwrite,
                    built_over: reuse.filter(|_| overwrite).map(Path::to_path_buf),
                }
            })
            .collect();
        Ok(Layout { targets })
    }

    /// Where the stream lands in the file built over `held`'s file, if one is: its entries
    /// found there in place need no writing. Not for an output that has pieces (its offsets
    /// skip theirs).
    pub(crate) fn in_place(&self, held: Option<&Arc<Held>>) -> Option<InPlace> {
        let held = held?;
        let (i, target) = self
            .targets
            .iter()
            .enumerate()
            .find(|(_, t)| t.overwrite && t.built_over.as_deref() == Some(held.path()))?;
        if i == 0 && self.targets.len() > 1 {
            return None;
        }
        Some(InPlace {
            start: target.start,
            len: target.len,
            held: held.clone(),
        })
    }

    /// The output's final name.
    pub(crate) fn output(&self) -> &Path {
        &self.targets[0].path
    }

    /// The partial output, where the whole stream lands but for its pieces.
    pub(crate) fn partial_output(&self) -> &Path {
        &self.targets[0].partial
    }

    /// Opens every partial file for one connection's session: truncated, whatever an earlier
    /// connection left in it (zero entries are never written, and only an empty file reads
    /// them back as zeros), unless it is built over an earlier file.
    pub(crate) fn open(self: &Arc<Self>) -> Result<Sink, TransferError> {
        let files = self
            .targets
            .iter()
            .map(|t| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(!t.overwrite)
                    .mode(0o600)
                    .open(&t.partial)
                    .map_err(|source| TransferError::Output {
                        path: t.partial.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Sink {
            layout: self.clone(),
            files,
        })
    }

    /// Gives every file its final name, the pieces first: the output appears last, complete.
    pub(crate) fn commit(&self) -> Result<(), TransferError> {
        for t in self.targets.iter().rev() {
            std::fs::rename(&t.partial, &t.path).map_err(|source| TransferError::Output {
                path: t.path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Removes every partial file (after a failure).
    pub(crate) fn discard(&self) {
        for t in &self.targets {
            let _ = std::fs::remove_file(&t.partial);
        }
    }
}

/// Renames `base` to `partial`; whether that worked (a missing base is not worth a warning).
fn build_over(base: &Path, partial: &Path) -> bool {
    match std::fs::rename(base, partial) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            warn!(base = %base.display(), error = %e, "cannot reuse an earlier file; building a new one");
            false
        }
    }
}

/// Where a file is assembled until the transfer is complete and checked: never a half-written
/// file under the final name.
pub(crate) fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// The open files of a [`Layout`], written at stream offsets.
#[derive(Debug)]
pub(crate) struct Sink {
    layout: Arc<Layout>,
    files: Vec<File>,
}

impl Sink {
    /// The partial output's path, to name in errors.
    pub(crate) fn partial_output(&self) -> &Path {
        self.layout.partial_output()
    }

    /// Calls `f(target index, offset in that file, range of the stream)` for each part of the
    /// stream range `offset..offset + len`: pieces where they lie, the output elsewhere.
    fn split(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, std::ops::Range<u64>) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let pieces = &self.layout.targets[1..];
        // The first piece that ends after `offset`.
        let first = pieces.partition_point(|p| p.start + p.len.unwrap_or(0) <= offset);
        let mut at = offset;
        for (i, p) in pieces.iter().enumerate().skip(first) {
            if p.start >= end {
                break;
            }
            if p.start > at {
                f(0, at, at..p.start)?;
                at = p.start;
            }
            let stop = end.min(p.start + p.len.unwrap_or(0));
            f(i + 1, at - p.start, at..stop)?;
            at = stop;
        }
        if at < end {
            f(0, at, at..end)?;
        }
        Ok(())
    }

    /// Writes `buf`, the stream's bytes at `offset`.
    pub(crate) fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), TransferError> {
        let mut failed = 0;
        self.split(offset, buf.len() as u64, |i, at, range| {
            failed = i;
            let bytes = &buf[(range.start - offset) as usize..(range.end - offset) as usize];
            self.files[i].write_all_at(bytes, at)
        })
        .map_err(|source| self.error(failed, source))
    }

    /// Makes the stream's `len` bytes at `offset` read as zeros: nothing to do in a file
    /// created empty, a hole punched in one built over an earlier file.
    pub(crate) fn zeros(&self, offset: u64, len: u64) -> Result<(), TransferError> {
        let mut failed = 0;
        self.split(offset, len, |i, at, range| {
            failed = i;
            match self.layout.targets[i].overwrite {
                true => punch_zeros(&self.files[i], at, range.end - range.start),
                false => Ok(()),
            }
        })
        .map_err(|source| self.error(failed, source))
    }

    /// Sizes every file once the stream, `total` bytes long, is all written: the output to
    /// `total` (its pieces' ranges holes), each piece to its length. Fails when a piece lies
    /// beyond the stream's end.
    pub(crate) fn finish(&self, total: u64) -> Result<(), TransferError> {
        for (i, t) in self.layout.targets.iter().enumerate() {
            let sized = match t.len {
                None => self.files[i].set_len(total),
                Some(len) if t.start + len > total => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "this piece was to be the stream's bytes {}..{}, but the stream is only \
                         {total} bytes long",
                        t.start,
                        t.start + len
                    ),
                )),
                Some(len) => self.files[i].set_len(len),
            };
            sized.map_err(|source| self.error(i, source))?;
        }
        // An output built over an earlier file still holds its bytes where the pieces lie.
        if self.layout.targets[0].overwrite {
            for t in &self.layout.targets[1..] {
                let len = t.len.unwrap_or(0);
                punch_zeros(&self.files[0], t.start, len).map_err(|e| self.error(0, e))?;
            }
        }
        Ok(())
    }

    fn error(&self, target: usize, source: io::Error) -> TransferError {
        TransferError::Output {
            path: self.layout.targets[target].partial.clone(),
            source,
        }
    }
}

/// Makes `len` bytes at `offset` of `file` read as zeros: a hole punched in place (no pages
/// written), or zeros written where the file system cannot punch.
fn punch_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(dir: &Path, name: &str, offset: u64, len: u64) -> Piece {
        Piece {
            offset,
            len,
            path: dir.join(name),
            reuse: None,
        }
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn pieces_get_their_ranges_and_the_output_holes_there() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let pieces = [
            piece(dir.path(), "a", 2, 3),
            piece(dir.path(), "b", 5, 2),
            piece(dir.path(), "c", 9, 4),
        ];
        let layout = Arc::new(Layout::new(&out, None, &pieces).unwrap());
        let stream: Vec<u8> = (1..=14).collect();
        {
            let sink = layout.open().unwrap();
            // Writes that straddle the boundaries, in no particular order.
            sink.write_all_at(&stream[8..14], 8).unwrap();
            sink.write_all_at(&stream[0..4], 0).unwrap();
            sink.write_all_at(&stream[4..8], 4).unwrap();
            sink.finish(14).unwrap();
        }
        assert!(!out.exists(), "nothing under a final name before commit");
        layout.commit().unwrap();
        assert_eq!(read(&dir.path().join("a")), [3, 4, 5]);
        assert_eq!(read(&dir.path().join("b")), [6, 7]);
        assert_eq!(read(&dir.path().join("c")), [10, 11, 12, 13]);
        assert_eq!(read(&out), [1, 2, 0, 0, 0, 0, 0, 8, 9, 0, 0, 0, 0, 14]);
    }

    #[test]
    fn a_piece_built_over_an_earlier_file_keeps_nothing_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (out, old) = (dir.path().join("out"), dir.path().join("old"));
        std::fs::write(&old, [9u8; 8]).unwrap();
        let mut p = piece(dir.path(), "p", 2, 6);
        p.reuse = Some(old.clone());
        let layout = Arc::new(Layout::new(&out, None, &[p]).unwrap());
        assert!(!old.exists(), "the earlier file became the partial piece");
        let sink = layout.open().unwrap();
        sink.write_all_at(&[1, 2, 3, 4], 0).unwrap();
        sink.zeros(4, 2).unwrap();
        sink.write_all_at(&[7, 8], 6).unwrap();
        sink.finish(8).unwrap();
        layout.commit().unwrap();
        assert_eq!(read(&dir.path().join("p")), [3, 4, 0, 0, 7, 8]);
        assert_eq!(read(&out), [1, 2, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn overlapping_pieces_and_a_stream_too_short_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let overlapping = [piece(dir.path(), "a", 0, 4), piece(dir.path(), "b", 3, 2)];
        let err = Layout::new(&out, None, &overlapping).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");

        let layout = Arc::new(Layout::new(&out, None, &[piece(dir.path(), "a", 4, 4)]).unwrap());
        let sink = layout.open().unwrap();
        sink.write_all_at(&[1; 6], 0).unwrap();
        let err = sink.finish(6).unwrap_err();
        assert!(err.to_string().contains("only 6 bytes long"), "{err}");
        drop(sink);
        layout.discard();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
