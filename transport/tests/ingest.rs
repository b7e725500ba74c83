//! Ingesting a sent archive into the sender's own chunk store: a later transfer of the same
//! file towards that store sends no chunk, and of a 5%-rewritten copy only the new chunks; the
//! stored records are byte for byte what a receiver stores; a second ingest adds nothing, and
//! what the first added survived reopening the store; zero chunks are never stored; failures
//! name the file. The manifest a sender returns keeps the same chunks without cutting the
//! file again, and is refused for other files or for a file changed since. Transfers run over real QUIC on the loopback, every wait has a deadline and
//! nothing sleeps.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::timeout;
use transport::chunker::Chunker;
use transport::ingest::{ingest_file, ingest_manifest, IngestError, IngestReport};
use transport::quic::{self, ReceiveOptions, SendOptions, SendReport};
use transport::store::DiskStore;
use transport::tls::{init_certs, NodeIdentity};
use transport::ChunkId;

const DEADLINE: Duration = Duration::from_secs(60);
const PAGE: usize = 4096;
/// Bytes of a pack header and of a record header before its payload (see `store.rs`).
const PACK_HEADER_LEN: u64 = 8;
const RECORD_HEADER_LEN: u64 = 4 + 32 + 1 + 4 + 4;

struct Lab {
    tmp: TempDir,
    sender: NodeIdentity,
    receiver: NodeIdentity,
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = init_certs(
            &tmp.path().join("certs"),
            &["sender".into(), "receiver".into()],
        )
        .unwrap();
        Lab {
            sender: NodeIdentity::load(&dirs[0]).unwrap(),
            receiver: NodeIdentity::load(&dirs[1]).unwrap(),
            tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn store(&self, name: &str) -> Arc<DiskStore> {
        Arc::new(DiskStore::open(&self.path(name), None).unwrap())
    }

    /// Sends `src` from a node without any store to a receiver using `store`; checks the
    /// output and returns the sender's report.
    async fn transfer(&self, store: &Arc<DiskStore>, src: &Path) -> SendReport {
        let server =
            quic::server_endpoint(&self.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
        let addr = server.local_addr().unwrap();
        let client =
            quic::client_endpoint(&self.sender, Some("receiver"), quic::DEFAULT_IDLE_TIMEOUT)
                .unwrap();
        let out = self.path("out.bin");
        let send = SendOptions {
            keep_manifest: true,
            ..SendOptions::default()
        };
        let receive = ReceiveOptions::default();
        let receiving = quic::receive_file(&server, store.clone(), &out, &receive);
        let sending = quic::send_file(&client, addr, src, &send);
        let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
            .await
            .expect("the transfer finishes within the deadline");
        let (received, sent) = (received.unwrap(), sent.unwrap());
        assert_eq!(received.bytes_written, sent.input_bytes);
        assert!(
            std::fs::read(src).unwrap() == std::fs::read(&out).unwrap(),
            "output differs"
        );
        sent
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Text that compresses a few times, not a hundred: words with fresh numbers.
fn text(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &["page ", "heap ", "socket ", "mapping ", "dirty ", "inode "];
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes());
        if rng.u8(..4) == 0 {
            out.extend_from_slice(format!("{}\n", rng.u32(..)).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// About `len` bytes like a memory dump: runs of zero, text-like, random and repeated pages.
fn write_source(path: &Path, len: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let block: Vec<u8> = (0..300_000).map(|_| rng.u8(..)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut written = 0;
    while written < len {
        let run = PAGE * rng.usize(1..128);
        let bytes: Vec<u8> = match rng.u8(..10) {
            0..=3 => vec![0; run],
            4..=6 => text(&mut rng, run),
            7 => block.iter().copied().cycle().take(run).collect(),
            _ => (0..run).map(|_| rng.u8(..)).collect(),
        };
        out.write_all(&bytes).unwrap();
        written += run;
    }
    out.flush().unwrap();
}

/// Copies `src` to `dst` with `fraction` of its pages overwritten by random bytes, in runs of
/// 1–64 pages; returns the pages rewritten.
fn write_rewritten_copy(src: &Path, dst: &Path, fraction: f64, seed: u64) -> usize {
    std::fs::copy(src, dst).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    let pages = std::fs::metadata(src).unwrap().len() as usize / PAGE;
    let target = (pages as f64 * fraction) as usize;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut marked = vec![false; pages];
    let mut rewritten = 0;
    while rewritten < target {
        let start = rng.usize(..pages);
        let end = (start + rng.usize(1..=64)).min(pages);
        for (page, done) in marked.iter_mut().enumerate().take(end).skip(start) {
            let bytes: Vec<u8> = (0..PAGE).map(|_| rng.u8(..)).collect();
            file.write_all_at(&bytes, (page * PAGE) as u64).unwrap();
            if !*done {
                *done = true;
                rewritten += 1;
            }
        }
    }
    rewritten
}

/// (distinct non-zero chunk ids, distinct zero chunk ids, number of chunks) as a transfer
/// would cut `path`.
fn chunk_ids(path: &Path) -> (HashSet<ChunkId>, HashSet<ChunkId>, u64) {
    let (mut nonzero, mut zero, mut count) = (HashSet::new(), HashSet::new(), 0);
    for span in Chunker::new(std::fs::File::open(path).unwrap()) {
        let entry = span.unwrap().entry;
        count += 1;
        if entry.zero {
            zero.insert(entry.id);
        } else {
            nonzero.insert(entry.id);
        }
    }
    (nonzero, zero, count)
}

/// The counts of a report always add up.
fn check_sums(report: &IngestReport, path: &Path) {
    assert_eq!(
        report.zero_chunks + report.chunks_added + report.chunks_present,
        report.chunks,
        "{report:?}"
    );
    assert_eq!(report.bytes, std::fs::metadata(path).unwrap().len());
}

async fn ingest_blocking(store: &Arc<DiskStore>, path: &Path) -> IngestReport {
    let (store, path) = (store.clone(), path.to_path_buf());
    let level = SendOptions::default().level;
    tokio::task::spawn_blocking(move || ingest_file(&store, &path, level))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ingested_the_file_is_sent_nothing_then_only_the_rewritten_chunks() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 20 << 20, 1);
    let (src_ids, _, src_chunks) = chunk_ids(&src);

    // The node sent `src` away and kept its chunks; its store never received anything.
    let store = lab.store("a");
    let ingested = ingest_blocking(&store, &src).await;
    check_sums(&ingested, &src);
    assert_eq!(ingested.chunks, src_chunks);
    assert_eq!(ingested.chunks_added as usize, src_ids.len());
    assert_eq!(store.len(), src_ids.len());

    // The container migrates back: the file comes to this node, and no chunk has to.
    let back = lab.transfer(&store, &src).await;
    assert_eq!(back.chunks, src_chunks);
    assert_eq!(back.chunks_sent, 0, "the ingested store had every chunk");
    assert!(
        back.wire_bytes < back.input_bytes / 100,
        "only the manifest may cross the wire: {back:?}"
    );

    // A copy with 5% of its pages rewritten: only chunks the source did not have are sent.
    let copy = lab.path("copy.bin");
    let pages = write_rewritten_copy(&src, &copy, 0.05, 2);
    assert!(pages >= (20 << 20) / PAGE / 20);
    let (copy_ids, _, copy_chunks) = chunk_ids(&copy);
    let new = copy_ids.difference(&src_ids).count();
    assert!(new > 0, "the rewrite changed some chunks");
    let changed = lab.transfer(&store, &copy).await;
    assert_eq!(changed.chunks_sent as usize, new, "exactly the new chunks");
    assert!(
        changed.chunks_sent * 4 < copy_chunks,
        "a 5% rewrite sent {} of {copy_chunks} chunks",
        changed.chunks_sent
    );
    assert!(
        changed.wire_bytes < changed.input_bytes / 4,
        "a 5% rewrite put {} of {} bytes on the wire",
        changed.wire_bytes,
        changed.input_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_chunks_are_stored_exactly_as_a_receiver_stores_them() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 12 << 20, 3);
    let (ids, _, _) = chunk_ids(&src);

    let received = lab.store("received");
    let sent = lab.transfer(&received, &src).await;
    assert_eq!(
        sent.chunks_sent as usize,
        ids.len(),
        "an empty store got all"
    );
    let ingested = lab.store("ingested");
    ingest_blocking(&ingested, &src).await;

    assert_eq!(ingested.len(), received.len());
    let mut compressed = 0;
    for id in &ids {
        let theirs = received.get_encoded(id).unwrap().expect("received");
        let ours = ingested.get_encoded(id).unwrap().expect("ingested");
        assert_eq!(ours.encoding, theirs.encoding, "chunk {id}");
        assert!(
            ours.payload == theirs.payload,
            "chunk {id}: payloads differ"
        );
        compressed += usize::from(ours.encoding == transport::codec::Encoding::Zstd);
    }
    assert!(compressed > 0, "text chunks are stored compressed");
    assert!(compressed < ids.len(), "random chunks are stored raw");
}

/// Records and pack headers account for every byte of the store: no duplicate record.
fn assert_no_dead_space(store: &DiskStore, ids: &HashSet<ChunkId>) {
    let packs = std::fs::read_dir(store.root().join("packs"))
        .unwrap()
        .count() as u64;
    let records: u64 = ids
        .iter()
        .map(|id| RECORD_HEADER_LEN + store.get_encoded(id).unwrap().unwrap().payload.len() as u64)
        .sum();
    assert_eq!(store.bytes(), packs * PACK_HEADER_LEN + records);
}

#[test]
fn ingesting_twice_adds_nothing_the_second_time_and_the_first_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    write_source(&src, 16 << 20, 4);
    let (ids, _, chunks) = chunk_ids(&src);
    let root = dir.path().join("store");

    let first = {
        let store = DiskStore::open(&root, None).unwrap();
        let report = ingest_file(&store, &src, 1).unwrap();
        assert_eq!(store.pending(), 0, "everything committed");
        report
    };
    check_sums(&first, &src);
    assert_eq!(first.chunks, chunks);
    assert_eq!(first.chunks_added as usize, ids.len());
    assert!(
        first.chunks_present > 0,
        "the repeated block repeats chunks within the file"
    );

    // Opening deletes uncommitted packs: only what was synced is still there.
    let store = DiskStore::open(&root, None).unwrap();
    assert_eq!(store.len(), ids.len());
    assert!(ids.iter().all(|id| store.contains(id)));
    assert_no_dead_space(&store, &ids);
    let bytes = store.bytes();

    let second = ingest_file(&store, &src, 1).unwrap();
    check_sums(&second, &src);
    assert_eq!(second.chunks_added, 0);
    assert_eq!(second.chunks_present, second.chunks - second.zero_chunks);
    assert_eq!(second.zero_chunks, first.zero_chunks);
    assert_eq!(store.bytes(), bytes, "nothing written");
    assert_eq!(store.len(), ids.len());
}

#[test]
fn zero_chunks_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    write_source(&src, 16 << 20, 5);
    let (nonzero, zero, _) = chunk_ids(&src);
    assert!(!zero.is_empty(), "the source has zero runs");
    let store = DiskStore::open(&dir.path().join("store"), None).unwrap();
    let report = ingest_file(&store, &src, 1).unwrap();
    check_sums(&report, &src);
    assert!(report.zero_chunks >= zero.len() as u64);
    assert!(zero.iter().all(|id| !store.contains(id)));
    assert_eq!(store.len(), nonzero.len());
    assert_no_dead_space(&store, &nonzero);

    // All zeros: nothing to store, not even an empty pack.
    let zeros = dir.path().join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 6 << 20]).unwrap();
    let store = DiskStore::open(&dir.path().join("empty"), None).unwrap();
    let report = ingest_file(&store, &zeros, 1).unwrap();
    check_sums(&report, &zeros);
    assert!(report.chunks > 1);
    assert_eq!(report.zero_chunks, report.chunks);
    assert!(store.is_empty());
    assert_eq!(store.bytes(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("empty/packs"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn failures_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&dir.path().join("store"), None).unwrap();
    let missing = dir.path().join("missing.tar");
    let err = ingest_file(&store, &missing, 1).unwrap_err();
    assert!(matches!(err, IngestError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.tar"), "{err}");

    // A directory opens but cannot be read.
    let err = ingest_file(&store, dir.path(), 1).unwrap_err();
    assert!(matches!(err, IngestError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    assert!(store.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_senders_manifest_keeps_the_same_chunks_and_is_refused_for_other_bytes() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 16 << 20, 6);
    let received = lab.store("received");
    let sent = lab.transfer(&received, &src).await;
    assert_eq!(sent.manifest.len() as u64, sent.chunks);

    let cut = lab.store("cut");
    let by_cutting = ingest_file(&cut, &src, 1).unwrap();
    let kept = lab.store("kept");
    let by_manifest = ingest_manifest(&kept, &[&src], &sent.manifest, 1, true).unwrap();
    check_sums(&by_manifest, &src);
    assert_eq!(by_manifest.chunks, by_cutting.chunks);
    assert_eq!(by_manifest.zero_chunks, by_cutting.zero_chunks);
    assert_eq!(by_manifest.chunks_added, by_cutting.chunks_added);
    assert_eq!(kept.len(), received.len());
    for (_, entry) in sent.manifest.iter().filter(|(_, e)| !e.zero) {
        let theirs = received.get_encoded(&entry.id).unwrap().expect("received");
        let ours = kept.get_encoded(&entry.id).unwrap().expect("kept");
        assert!(ours.payload == theirs.payload, "chunk {}", entry.id);
    }
    let again = ingest_manifest(&kept, &[&src], &sent.manifest, 1, false).unwrap();
    assert_eq!(again.chunks_added, 0);

    // Another file: the manifest does not cover it, and nothing is stored.
    let other = lab.path("other.bin");
    write_source(&other, 8 << 20, 7);
    let empty = lab.store("empty");
    let err = ingest_manifest(&empty, &[&other], &sent.manifest, 1, false).unwrap_err();
    assert!(matches!(err, IngestError::Manifest { .. }), "{err:?}");
    assert!(err.to_string().contains("other.bin"), "{err}");
    assert!(empty.is_empty());

    // The file changed after it was sent: the changed chunk is refused, never stored under the
    // old id, and the error names the file.
    let (offset, entry) = *sent
        .manifest
        .iter()
        .find(|(_, e)| !e.zero)
        .expect("a non-zero chunk");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&src)
        .unwrap();
    let old = {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, offset).unwrap();
        b[0]
    };
    file.write_all_at(&[old ^ 0xff], offset).unwrap();
    let fresh = lab.store("fresh");
    let err = ingest_manifest(&fresh, &[&src], &sent.manifest, 1, false).unwrap_err();
    assert!(matches!(err, IngestError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("src.bin"), "{err}");
    assert!(err.to_string().contains("changed"), "{err}");
    assert!(!fresh.contains(&entry.id));
}
