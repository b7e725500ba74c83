//! Cuts of a file taken while another process still appends to it.
//!
//! CRIU writes a checkpoint's memory pages (`pages-N.img`) front to back, and a pre-copy round
//! can only send them once the checkpoint has ended. Meanwhile one core is mostly idle.
//! [`cut_while_written`] follows such a file as it grows and cuts it as the sequential chunker
//! would, recording each cut with its fingerprint ([`crate::chunker::earlier`]). Given to the
//! send as an [`EarlierFile`](crate::chunker::earlier::EarlierFile), the cuts are taken again
//! where the file's bytes still match their fingerprints, at a fraction of the cost of cutting
//! and hashing them. A file rewritten after it was read costs nothing but the wasted work:
//! its cuts no longer match and are made afresh.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use super::earlier::EarlierCut;
use super::Chunker;

/// How long a reader at the end of a file that may still grow waits before it looks again.
const POLL: Duration = Duration::from_millis(1);

/// What the writer of a followed file is doing, as [`cut_while_written`] asks before each read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writing {
    /// It may still append: at the end of the file, wait for more.
    Appending,
    /// It is done: read to the end of the file.
    Complete,
    /// Stop now, wherever the reading is: the cuts made so far are returned.
    Abandoned,
}

/// Cuts the file at `path` as it is written, asking `writing` before each read what its
/// writer is doing (and telling it how many bytes were read so far). Returns the cuts as
/// [`Chunker::record_cuts`] records them, offsets from the file's start: all of the file's
/// when the writer completed it, a prefix when `writing` abandoned the reading.
pub fn cut_while_written(
    path: &Path,
    writing: &dyn Fn(u64) -> Writing,
) -> io::Result<Vec<EarlierCut>> {
    let file = File::open(path)?;
    Chunker::new(Appended {
        file,
        writing,
        read: 0,
    })
    .record_cuts()
}

/// A file read while it grows: at its end, reads wait until it grows or its writer is done.
struct Appended<'a> {
    file: File,
    writing: &'a dyn Fn(u64) -> Writing,
    /// Bytes read so far.
    read: u64,
}

impl Read for Appended<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Asked before reading: a read that finds nothing after the writer said it was done
            // is the end of the file.
            let writing = (self.writing)(self.read);
            if writing == Writing::Abandoned {
                return Ok(0);
            }
            let n = self.file.read(buf)?;
            if n > 0 || writing == Writing::Complete {
                self.read += n as u64;
                return Ok(n);
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::chunker::earlier::{Earlier, EarlierCuts, EarlierFile};
    use crate::chunker::parallel::cut_parallel;
    use crate::chunker::parallel::tests::mixed;

    fn recorded(bytes: &[u8]) -> Vec<EarlierCut> {
        Chunker::new(bytes).record_cuts().unwrap()
    }

    #[test]
    fn a_file_cut_while_it_was_appended_to_has_the_cuts_of_the_whole_file() {
        let bytes = mixed(9 << 20, 21);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        let mut out = File::create(&path).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let (d, r, p) = (done.clone(), reads.clone(), path.clone());
        let cutter = std::thread::spawn(move || {
            let writing = |_| {
                r.fetch_add(1, Ordering::Relaxed);
                match d.load(Ordering::Acquire) {
                    true => Writing::Complete,
                    false => Writing::Appending,
                }
            };
            cut_while_written(&p, &writing).unwrap()
        });
        // Appended in uneven pieces, each only once the cutter has asked again since the
        // last, so it meets the end of the file while the file still grows.
        for piece in bytes.chunks(700_001) {
            let asked = reads.load(Ordering::Relaxed);
            out.write_all(piece).unwrap();
            while reads.load(Ordering::Relaxed) == asked {
                std::thread::yield_now();
            }
        }
        done.store(true, Ordering::Release);
        let cuts = cutter.join().unwrap();
        assert_eq!(cuts, recorded(&bytes));

        // A send of the finished file takes them: all but the last cuts, which had less than a
        // maximal chunk of file after them.
        let files = [EarlierFile {
            current: path.clone(),
            cuts,
        }];
        let earlier = Earlier::new(&files, |p| (p == path).then_some((0, bytes.len() as u64)));
        let read_at = |buf: &mut [u8], at: u64| {
            buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let take = EarlierCuts {
            take: Some(&earlier),
            record: None,
        };
        cut_parallel(bytes.len() as u64, &read_at, 2, 1 << 20, take, |_, _| true).unwrap();
        let untaken = bytes.len() as u64 - earlier.reused_bytes();
        assert!(
            untaken <= 2 * u64::from(crate::MAX_CHUNK_LEN),
            "{untaken} bytes were cut again"
        );
    }

    #[test]
    fn an_abandoned_reading_returns_the_cuts_made_so_far() {
        let bytes = mixed(8 << 20, 22);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        std::fs::write(&path, &bytes).unwrap();
        // Abandoned after three reads, long before the end.
        let asked = AtomicUsize::new(0);
        let got = AtomicUsize::new(0);
        let writing = |read| {
            got.store(read as usize, Ordering::Relaxed);
            match asked.fetch_add(1, Ordering::Relaxed) {
                0..3 => Writing::Appending,
                _ => Writing::Abandoned,
            }
        };
        let cuts = cut_while_written(&path, &writing).unwrap();
        let read = got.load(Ordering::Relaxed);
        assert!(read > 0 && read < bytes.len(), "{read} bytes read");
        let all = recorded(&bytes);
        assert!(!cuts.is_empty());
        assert!(
            cuts.len() < all.len(),
            "{} of {} cuts",
            cuts.len(),
            all.len()
        );
        assert_eq!(cuts[..], all[..cuts.len()]);
        let last = cuts.last().unwrap();
        assert!(last.offset + u64::from(last.entry.len) <= read as u64);
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = cut_while_written(&dir.path().join("none"), &|_| Writing::Complete).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
