//! The first pre-copy round's page images, cut while CRIU writes them.
//!
//! A pre-copy checkpoint of a large container spends about a second in CRIU writing the
//! memory pages (`pages-1.img`, `pages-2.img`, … front to back) while the transfer waits, and
//! one core stays idle. [`CutAhead`] follows those files from a thread of its own, at the
//! lowest CPU priority, as they grow and cuts them (`transport::chunker::appending`). When
//! the checkpoint returns, it stops where it is and hands over the cuts it made, by file
//! name, as earlier cuts ([`crate::earlier_cuts`]): the round's send then takes them where the
//! bytes still match their fingerprints instead of cutting and hashing those bytes again.
//! Later rounds do not need it: they take the cuts of the round before.
//!
//! Nothing here can change what is sent. A cut that does not match the bytes sent is made
//! afresh, and a file that cannot be read only leaves its cuts out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info};
use transport::chunker::appending::{cut_while_written, Writing};
use transport::chunker::earlier::EarlierFile;

/// How long the thread waits between looks for the next page image to appear.
const POLL: Duration = Duration::from_millis(2);

/// A thread cutting the page images of one checkpoint as they are written.
#[derive(Debug)]
pub struct CutAhead {
    folder: mpsc::Sender<PathBuf>,
    stop: Arc<AtomicBool>,
    /// Bytes of page images read and cut so far, all files together.
    progress: Arc<AtomicU64>,
    /// Taken by [`CutAhead::finish`].
    thread: Option<JoinHandle<Vec<EarlierFile>>>,
}

impl CutAhead {
    /// Starts the thread; it waits for [`CutAhead::writing_to`] to name the folder.
    pub fn start() -> std::io::Result<CutAhead> {
        let (folder, named) = mpsc::channel::<PathBuf>();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (stopped, read) = (stop.clone(), progress.clone());
        let thread = std::thread::Builder::new()
            .name("cut-ahead".into())
            .spawn(move || {
                // The container is frozen while CRIU writes: this work, which only may save
                // some later, must not take CRIU's CPU. On Linux the priority is the thread's.
                if let Err(e) = rustix::process::setpriority_process(None, 19) {
                    debug!(error = %e, "could not lower the priority of cutting ahead");
                }
                match named.recv() {
                    Ok(dir) => follow(&dir, &stopped, &read),
                    Err(_) => Vec::new(),
                }
            })?;
        Ok(CutAhead {
            folder,
            stop,
            progress,
            thread: Some(thread),
        })
    }

    /// What to give [`crate::runtime::Runtime::checkpoint_kept`]: it names the folder the
    /// images go to.
    pub fn writing_to(&self) -> impl Fn(&Path) + Send + 'static {
        let folder = self.folder.clone();
        move |dir: &Path| {
            let _ = folder.send(dir.to_path_buf());
        }
    }

    /// Once the checkpoint has returned: stops the thread where it is and returns the cuts it
    /// made, one [`EarlierFile`] per page image, named by its file name alone.
    pub fn finish(mut self) -> Vec<EarlierFile> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("finish runs once");
        let progress = self.progress.clone();
        // Unblocks a thread still waiting for the folder.
        drop(self);
        let files = thread.join().unwrap_or_else(|_| {
            debug!("the thread cutting page images ahead panicked; none of its cuts are used");
            Vec::new()
        });
        let bytes = progress.load(Ordering::Relaxed);
        if bytes > 0 {
            info!(
                bytes,
                files = files.len(),
                "page images cut while CRIU wrote them"
            );
        }
        files
    }

    /// Bytes of page images read and cut so far.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }
}

impl Drop for CutAhead {
    /// A migration dropped while its checkpoint ran (an abort) stops the thread too; it ends
    /// on its own at its next look.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Cuts `dir/pages-1.img`, `pages-2.img`, … in turn as they appear and grow, until `stop`,
/// counting the bytes read in `progress`. A file is whole once the next one exists.
fn follow(dir: &Path, stop: &AtomicBool, progress: &AtomicU64) -> Vec<EarlierFile> {
    let mut files = Vec::new();
    let mut before = 0;
    for n in 1.. {
        let name = format!("pages-{n}.img");
        let path = dir.join(&name);
        while !path.exists() {
            if stop.load(Ordering::Acquire) {
                return files;
            }
            std::thread::sleep(POLL);
        }
        let next = dir.join(format!("pages-{}.img", n + 1));
        let writing = |read| {
            progress.store(before + read, Ordering::Relaxed);
            match (stop.load(Ordering::Acquire), next.exists()) {
                (true, _) => Writing::Abandoned,
                (false, true) => Writing::Complete,
                (false, false) => Writing::Appending,
            }
        };
        match cut_while_written(&path, &writing) {
            Ok(cuts) => files.push(EarlierFile {
                current: PathBuf::from(name),
                cuts,
            }),
            Err(e) => {
                debug!(error = %e, file = %path.display(), "cutting a page image ahead failed");
                return files;
            }
        }
        if stop.load(Ordering::Acquire) {
            return files;
        }
        before = progress.load(Ordering::Relaxed);
    }
    files
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use transport::chunker::Chunker;

    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn page_images_written_one_after_another_are_cut_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = CutAhead::start().unwrap();
        ahead.writing_to()(dir.path());
        let (one, two) = (bytes(3 << 20, 1), bytes(2 << 20, 2));
        std::fs::write(dir.path().join("pages-1.img"), &one).unwrap();
        // The first is whole once the second appears; the second grows in two writes.
        let mut f = std::fs::File::create(dir.path().join("pages-2.img")).unwrap();
        f.write_all(&two[..1 << 20]).unwrap();
        f.write_all(&two[1 << 20..]).unwrap();
        let total = (one.len() + two.len()) as u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while ahead.progress() < total {
            assert!(Instant::now() < deadline, "{} bytes cut", ahead.progress());
            std::thread::sleep(Duration::from_millis(1));
        }
        // Everything was read: stopping now leaves both files' cuts whole.
        let files = ahead.finish();
        let names: Vec<_> = files.iter().map(|f| f.current.clone()).collect();
        assert_eq!(names, ["pages-1.img", "pages-2.img"].map(PathBuf::from));
        assert_eq!(files[0].cuts, Chunker::new(&one[..]).record_cuts().unwrap());
        assert_eq!(files[1].cuts, Chunker::new(&two[..]).record_cuts().unwrap());
    }

    #[test]
    fn stopped_before_the_end_the_cuts_are_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = CutAhead::start().unwrap();
        ahead.writing_to()(dir.path());
        let one = bytes(6 << 20, 3);
        let mut f = std::fs::File::create(dir.path().join("pages-1.img")).unwrap();
        f.write_all(&one[..4 << 20]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while ahead.progress() < 4 << 20 {
            assert!(Instant::now() < deadline, "{} bytes cut", ahead.progress());
            std::thread::sleep(Duration::from_millis(1));
        }
        // The rest comes after the stop: it is not cut.
        let files = ahead.finish();
        f.write_all(&one[4 << 20..]).unwrap();
        let all = Chunker::new(&one[..]).record_cuts().unwrap();
        let cuts = &files[0].cuts;
        assert!(!cuts.is_empty() && cuts.len() < all.len());
        assert_eq!(cuts[..], all[..cuts.len()]);
    }

    #[test]
    fn without_a_folder_there_are_no_cuts() {
        let ahead = CutAhead::start().unwrap();
        assert!(ahead.finish().is_empty());
    }
}
