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

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One file of a [`Source`], at its place in the stream.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    file: File,
    /// Offset of the file's first byte in the stream.
    start: u64,
    len: u64,
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
        let mut parts = Vec::with_capacity(paths.len());
        let mut len = 0u64;
        for path in paths {
            let path = path.as_ref();
            let opened = File::open(path).and_then(|f| Ok((f.metadata()?.len(), f)));
            let (file_len, file) = opened.map_err(|e| (path.to_path_buf(), e))?;
            parts.push(Part {
                path: path.to_path_buf(),
                file,
                start: len,
                len: file_len,
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
