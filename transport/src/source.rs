//! What a sender reads: one file, or several files read back to back as one stream.
//!
//! A transfer moves one stream. Usually that is a checkpoint archive, but a pre-copy round
//! only warms the destination's chunk store with the memory pages of a checkpoint, which CRIU
//! leaves as a few `pages-N.img` files; packing them into one archive first would copy every
//! byte once more. [`Source`] presents the files, opened once and sized when opened, as one
//! stream: [`Source::reader`] reads it in order (for the chunker) and
//! [`Source::read_exact_at`] reads any range of it (for the chunk streams), across file
//! boundaries. Files must not change while they are sent: the receiver checks every chunk
//! against its id, so a chunk read after its file changed fails the transfer there.
//!
//! [`Source::open_mapped`] also maps the files read-only, and [`Source::bytes_at`] then lends
//! any range inside one file as it lies in the page cache: the chunker cuts and hashes it, and
//! the chunk streams compress it, without first copying it into a buffer (that copy was a
//! tenth of a pre-copy round's CPU on the sending node). A mapped file that is truncated while
//! mapped kills the process (`SIGBUS`) instead of failing one read, so only files nobody else
//! writes are mapped: the engine's own checkpoint images, in its private folders.
//! [`Source::open`] reads with `pread` and is safe for any file.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::chunker::parallel::ReadAt;

/// One file of a [`Source`], at its place in the stream.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    file: File,
    /// Offset of the file's first byte in the stream.
    start: u64,
    len: u64,
    /// The file mapped read-only, when opened with [`Source::open_mapped`] (and not empty).
    map: Option<Mmap>,
}

impl Part {
    /// The error for a file that ends before the length it had when opened.
    fn shrank(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{} is shorter than when the transfer began",
                self.path.display()
            ),
        )
    }
}

/// Files read as one stream, in the order given.
#[derive(Debug)]
pub struct Source {
    parts: Vec<Part>,
    len: u64,
}

impl Source {
    /// Opens `paths` and sizes them; the stream is their contents back to back. Errors name
    /// the file that could not be opened.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Source, (PathBuf, io::Error)> {
        Source::opened(paths, false)
    }

    /// [`Source::open`], and maps every non-empty file read-only, for [`Source::bytes_at`].
    /// Only for files nobody truncates while the source lives (see the module documentation).
    pub fn open_mapped<P: AsRef<Path>>(paths: &[P]) -> Result<Source, (PathBuf, io::Error)> {
        Source::opened(paths, true)
    }

    fn opened<P: AsRef<Path>>(paths: &[P], mapped: bool) -> Result<Source, (PathBuf, io::Error)> {
        let mut parts = Vec::with_capacity(paths.len());
        let mut len = 0u64;
        for path in paths {
            let path = path.as_ref();
            let opened = File::open(path).and_then(|f| Ok((f.metadata()?.len(), f)));
            let (file_len, file) = opened.map_err(|e| (path.to_path_buf(), e))?;
            let map = match mapped && file_len > 0 {
                true => Some(map_read_only(&file, file_len).map_err(|e| (path.to_path_buf(), e))?),
                false => None,
            };
            parts.push(Part {
                path: path.to_path_buf(),
                file,
                start: len,
                len: file_len,
                map,
            });
            len += file_len;
        }
        Ok(Source { parts, len })
    }

    /// Bytes in the stream.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file that holds stream offset `offset` (the last file past the end), for messages.
    pub fn path_at(&self, offset: u64) -> &Path {
        self.locate(offset).0
    }

    /// The file that holds stream offset `offset` and where in it (the last file past the
    /// end), for messages.
    pub fn locate(&self, offset: u64) -> (&Path, u64) {
        let i = self
            .part_at(offset)
            .unwrap_or(self.parts.len().saturating_sub(1));
        self.parts
            .get(i)
            .map_or((Path::new("(no file)"), offset), |p| {
                (p.path.as_path(), offset.saturating_sub(p.start))
            })
    }

    /// Where the stream holds the file opened as `path` (as given to [`Source::open`]): its
    /// first byte's offset and its length; the first such file if given twice.
    pub fn span_of(&self, path: &Path) -> Option<(u64, u64)> {
        self.parts
            .iter()
            .find(|p| p.path == path)
            .map(|p| (p.start, p.len))
    }

    /// Index of the part holding `offset`, skipping empty files.
    fn part_at(&self, offset: u64) -> Option<usize> {
        let i = self.parts.partition_point(|p| p.start + p.len <= offset);
        (i < self.parts.len()).then_some(i)
    }

    /// The `len` bytes at stream offset `offset`, lent from the file's map without a copy:
    /// `None` when the range is not inside one mapped file (not mapped, across a file boundary,
    /// or past the end); [`Source::read_exact_at`] reads it then.
    pub fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let part = &self.parts[self.part_at(offset)?];
        let within = usize::try_from(offset - part.start).ok()?;
        part.map.as_ref()?.get(within..within.checked_add(len)?)
    }

    /// Fills `buf` from stream offset `offset`; `UnexpectedEof` past the end, or when a file
    /// shrank since it was opened.
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let Some(i) = self.part_at(offset) else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read past the end of the stream ({} bytes)", self.len),
                ));
            };
            let part = &self.parts[i];
            let within = offset - part.start;
            let n = buf.len().min((part.len - within) as usize);
            let (now, rest) = buf.split_at_mut(n);
            part.file
                .read_exact_at(now, within)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => part.shrank(),
                    _ => e,
                })?;
            buf = rest;
            offset += n as u64;
        }
        Ok(())
    }

    /// Reads the whole stream in order from its start.
    pub fn reader(self: &Arc<Self>) -> SourceReader {
        SourceReader {
            source: self.clone(),
            pos: 0,
        }
    }
}

impl ReadAt for Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Source::read_exact_at(self, buf, offset)
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        Source::bytes_at(self, offset, len)
    }
}

/// Maps the first `len` bytes of `file` read-only.
#[allow(unsafe_code)]
fn map_read_only(file: &File, len: u64) -> io::Result<Mmap> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: the map is only read, and only ever lent out as `&[u8]` borrowed from the
    // `Source` that owns it. Its bytes may change if the file is written meanwhile; that is
    // the same hazard as for `pread` (the receiver checks every chunk against its id). A
    // truncation would fault the process: `open_mapped` is documented for files nobody else
    // writes, and the engine maps only its own checkpoint images.
    unsafe { memmap2::MmapOptions::new().len(len).map(file) }
}

/// A sequential [`Read`] over a [`Source`]; ends at the length the files had when opened.
#[derive(Debug)]
pub struct SourceReader {
    source: Arc<Source>,
    pos: u64,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(i) = self.source.part_at(self.pos) else {
            return Ok(0);
        };
        let part = &self.source.parts[i];
        let within = self.pos - part.start;
        let n = buf.len().min((part.len - within) as usize);
        let got = part.file.read_at(&mut buf[..n], within)?;
        if got == 0 {
            return Err(part.shrank());
        }
        self.pos += got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, contents: &[&[u8]]) -> Vec<PathBuf> {
        contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = dir.join(format!("f{i}"));
                std::fs::write(&p, c).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn files_read_as_one_stream_in_order_and_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &[b"abc", b"", b"defgh", b"ij"]);
        let source = Arc::new(Source::open(&paths).unwrap());
        assert_eq!(source.len(), 10);
        let mut all = Vec::new();
        source.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcdefghij");
        for start in 0..10u64 {
            for end in start..=10u64 {
                let mut buf = vec![0; (end - start) as usize];
                source.read_exact_at(&mut buf, start).unwrap();
                assert_eq!(buf, &b"abcdefghij"[start as usize..end as usize]);
            }
        }
        assert_eq!(source.path_at(3), paths[2]);
        assert_eq!(source.locate(4), (paths[2].as_path(), 1));
        let mut past = [0u8; 2];
        let err = source.read_exact_at(&mut past, 9).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_mapped_source_lends_ranges_inside_one_file_and_reads_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &[b"abc", b"", b"defgh", b"ij"]);
        let source = Source::open_mapped(&paths).unwrap();
        assert_eq!(source.bytes_at(3, 5), Some(&b"defgh"[..]));
        assert_eq!(source.bytes_at(4, 2), Some(&b"ef"[..]));
        assert_eq!(source.bytes_at(8, 2), Some(&b"ij"[..]));
        // Across a file boundary, past the end: read, not lent.
        assert_eq!(source.bytes_at(2, 2), None);
        assert_eq!(source.bytes_at(9, 2), None);
        assert_eq!(source.bytes_at(10, 1), None);
        let mut buf = [0u8; 2];
        source.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"cd");
        // Opened to be read, it lends nothing.
        let plain = Source::open(&paths).unwrap();
        assert_eq!(plain.bytes_at(3, 5), None);
    }

    #[test]
    fn a_missing_file_is_named_and_a_shrunk_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = files(dir.path(), &[b"abc"]);
        paths.push(dir.path().join("missing"));
        let (path, _) = Source::open(&paths).unwrap_err();
        assert_eq!(path, dir.path().join("missing"));

        let paths = files(dir.path(), &[b"abcdef"]);
        let source = Arc::new(Source::open(&paths).unwrap());
        std::fs::write(&paths[0], b"ab").unwrap();
        let mut all = Vec::new();
        let err = source.reader().read_to_end(&mut all).unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }
}
