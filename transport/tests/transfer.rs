//! Whole transfers over real QUIC on the loopback: a clean transfer and its deduplicated
//! repeat, a connection that goes dark mid-transfer and resumes, a sender with a foreign
//! certificate, hostile peers that send a bad chunk, a malformed frame or a wrong manifest
//! digest, a receiver whose chunk store holds a corrupted chunk, the datagram size a path with
//! large datagrams gets, and files sent from read-only maps. Every wait has a deadline; nothing
//! sleeps to synchronise.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{loopback, same_file, write_source, Lab, DEADLINE};
use tempfile::TempDir;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use transport::chunker::earlier::{per_file, EarlierFile};
use transport::chunker::Chunker;
use transport::frame::{AbortCode, Frame, VERSION};
use transport::ingest::ingest_file;
use transport::protocol::ProtocolError;
use transport::quic::{self, ReceiveOptions, SendOptions, TransferError};
use transport::store::DiskStore;
use transport::tls::{init_certs, NodeIdentity, SERVER_NAME};
use transport::{ChunkId, ManifestDigest, ManifestEntry};

static SEND: std::sync::LazyLock<SendOptions> = std::sync::LazyLock::new(SendOptions::default);
static RECEIVE: std::sync::LazyLock<ReceiveOptions> =
    std::sync::LazyLock::new(ReceiveOptions::default);

fn unique_nonzero_chunks(path: &Path) -> usize {
    let chunker = Chunker::new(std::fs::File::open(path).unwrap());
    let ids: HashSet<ChunkId> = chunker
        .map(|s| s.unwrap().entry)
        .filter(|e| !e.zero)
        .map(|e| e.id)
        .collect();
    ids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_then_repeat_sends_only_the_manifest() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 24 << 20, 1);
    let store = lab.store();
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        quic::client_endpoint(&lab.sender, Some("receiver"), quic::DEFAULT_IDLE_TIMEOUT).unwrap();

    for round in 0..2 {
        let out = lab.path(&format!("out{round}.bin"));
        let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
        let sending = quic::send_file(&client, addr, &src, &SEND);
        let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
            .await
            .unwrap();
        let (received, sent) = (received.unwrap(), sent.unwrap());
        assert!(same_file(&src, &out), "round {round}: output differs");
        assert_eq!(received.bytes_written, sent.input_bytes);
        assert_eq!(received.peer, "sender");
        if round == 0 {
            assert_eq!(sent.chunks_sent as usize, unique_nonzero_chunks(&src));
            assert!(
                sent.wire_bytes < sent.input_bytes,
                "zero runs and text must shrink"
            );
        } else {
            assert_eq!(sent.chunks_sent, 0, "the store already had every chunk");
            assert_eq!(sent.chunks_reused, sent.chunks);
            assert!(sent.wire_bytes < sent.input_bytes / 100);
        }
    }
    // Checkpoints hold secrets: the output is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(lab.path("out0.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The loopback carries 64 KiB datagrams, so MTU discovery takes the connection up to
/// `MAX_UDP_PAYLOAD` and the transfer's full GSO batches of that size reach the receiver. With
/// datagrams too large for one GSO send (10 × 8,952 bytes), the kernel refused every full batch,
/// quinn took the losses for a black hole and fell back to 1,200-byte datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_with_large_datagrams_is_used_at_the_largest_size_that_fits_a_gso_send() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    let mut rng = fastrand::Rng::with_seed(7);
    let random: Vec<u8> = (0..32 << 20).map(|_| rng.u8(..)).collect();
    std::fs::write(&src, &random).unwrap();
    let out = lab.path("out.bin");
    let (_, sent) = send_files_to(&lab, &[&src], &out, &RECEIVE).await;
    assert!(same_file(&src, &out));
    assert!(sent.wire_bytes > 32 << 20, "random bytes do not shrink");
    assert_eq!(
        sent.path_mtu,
        quic::MAX_UDP_PAYLOAD,
        "the connection ended below the largest datagram size"
    );
}

/// A stream sent from several files, received over an earlier round's output
/// (`ReceiveOptions::reuse`): the output is the files back to back, whatever the earlier output
/// held where the new stream has zero runs or ends, and the earlier output is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_files_as_one_stream_rebuilt_over_an_earlier_output() {
    let lab = Lab::new();
    let a = lab.path("a.bin");
    write_source(&a, 5 << 20, 3);
    // A megabyte-long zero run between two files' worth of data: whole zero chunks.
    let b = lab.path("b.bin");
    write_source(&b, 2 << 20, 4);
    let mut b_bytes = vec![0u8; 1 << 20];
    b_bytes.extend(std::fs::read(&b).unwrap());
    std::fs::write(&b, &b_bytes).unwrap();
    let expected = lab.path("expected.bin");
    let mut both = std::fs::read(&a).unwrap();
    both.extend(&b_bytes);
    std::fs::write(&expected, &both).unwrap();
    // The earlier output: longer than the stream and 0xee throughout, so stale bytes show.
    let base = lab.path("base.bin");
    std::fs::write(&base, vec![0xee; both.len() + (3 << 20)]).unwrap();

    let out = lab.path("out.bin");
    let options = ReceiveOptions {
        reuse: Some(base.clone()),
        ..ReceiveOptions::default()
    };
    let (received, sent) = send_files_to(&lab, &[&a, &b], &out, &options).await;
    assert_eq!(sent.input_bytes, both.len() as u64);
    assert_eq!(received.bytes_written, both.len() as u64);
    assert!(sent.chunks_reused > 0, "the zero run made no zero chunk");
    assert!(
        same_file(&expected, &out),
        "output differs from the files back to back"
    );
    assert!(!base.exists(), "the earlier output was left behind");
}

/// Files sent from read-only maps (`SendOptions::map_files`: cut, hashed and compressed where
/// they lie) arrive byte for byte, cut into the very chunks a reading sender makes, also where
/// a chunk spans two files, and no map is left once the send has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_sent_from_their_maps_arrive_as_a_reading_sender_sends_them() {
    let lab = Lab::new();
    // Random, text, repeated and zero runs; the second file's length is no multiple of a page.
    let (a, b) = (lab.path("a.bin"), lab.path("b.bin"));
    write_source(&a, 6 << 20, 11);
    write_source(&b, 3 << 20, 12);
    let mut b_bytes = std::fs::read(&b).unwrap();
    b_bytes.truncate(b_bytes.len() - 1234);
    std::fs::write(&b, &b_bytes).unwrap();
    let expected = lab.path("expected.bin");
    let mut both = std::fs::read(&a).unwrap();
    both.extend(&b_bytes);
    std::fs::write(&expected, &both).unwrap();

    let mapped = SendOptions {
        map_files: true,
        keep_manifest: true,
        ..SendOptions::default()
    };
    let out = lab.path("mapped.bin");
    let (received, sent) = send_with(&lab, lab.store(), &[&a, &b], &out, &RECEIVE, &mapped).await;
    assert_eq!(received.bytes_written, both.len() as u64);
    assert!(
        same_file(&expected, &out),
        "the mapped files arrived changed"
    );
    assert!(
        sent.wire_bytes < both.len() as u64,
        "nothing was compressed: {} bytes on the wire",
        sent.wire_bytes
    );
    // Nothing holds the maps once the send has returned (not even QUIC, which keeps data it
    // has not seen acknowledged until the connection is gone): the caller deletes the files
    // next, and their memory must go then.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for file in [&a, &b] {
        let name = file.to_str().unwrap();
        assert!(!maps.contains(name), "{name} is still mapped");
    }

    // A reading sender, into an empty store: the same cuts, the same bytes.
    let reading = SendOptions {
        keep_manifest: true,
        ..SendOptions::default()
    };
    let store = Arc::new(DiskStore::open(&lab.path("second-store"), None).unwrap());
    let out = lab.path("read.bin");
    let (_, read) = send_with(&lab, store, &[&a, &b], &out, &RECEIVE, &reading).await;
    assert!(same_file(&expected, &out));
    assert_eq!(
        sent.manifest, read.manifest,
        "the maps were cut differently"
    );
    assert_eq!(sent.wire_bytes, read.wire_bytes);
}

/// Sends `files` as one stream over loopback QUIC to a receiver writing `out` with `options`;
/// both reports, once both sides succeeded.
async fn send_files_to(
    lab: &Lab,
    files: &[&std::path::PathBuf],
    out: &Path,
    options: &ReceiveOptions,
) -> (quic::ReceiveReport, quic::SendReport) {
    send_files_into(lab, lab.store(), files, out, options).await
}

/// [`send_files_to`] a receiver with the chunk store `store`.
async fn send_files_into(
    lab: &Lab,
    store: Arc<DiskStore>,
    files: &[&std::path::PathBuf],
    out: &Path,
    options: &ReceiveOptions,
) -> (quic::ReceiveReport, quic::SendReport) {
    send_with(lab, store, files, out, options, &SEND).await
}

/// [`send_files_into`], the sender with options `send`.
async fn send_with(
    lab: &Lab,
    store: Arc<DiskStore>,
    files: &[&std::path::PathBuf],
    out: &Path,
    options: &ReceiveOptions,
    send: &SendOptions,
) -> (quic::ReceiveReport, quic::SendReport) {
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        quic::client_endpoint(&lab.sender, Some("receiver"), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let receiving = quic::receive_file(&server, store, out, options);
    let sending = quic::send_files(&client, addr, files, send);
    let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
        .await
        .unwrap();
    (received.unwrap(), sent.unwrap())
}

/// The destination's restore path: a range of the stream (here the second file, after its zero
/// run) goes to a file of its own, built over a stale earlier file, and the output keeps a hole
/// there.
#[tokio::test]
async fn a_range_of_the_stream_written_to_its_own_file() {
    let lab = Lab::new();
    let (a, b) = (lab.path("a.bin"), lab.path("b.bin"));
    write_source(&a, 3 << 20, 5);
    write_source(&b, 4 << 20, 6);
    let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let stale = lab.path("stale.bin");
    std::fs::write(&stale, vec![0xee; b_bytes.len() + 4096]).unwrap();

    let (out, piece) = (lab.path("out.bin"), lab.path("piece.bin"));
    let options = ReceiveOptions {
        pieces: vec![quic::Piece {
            offset: a_bytes.len() as u64,
            len: b_bytes.len() as u64,
            path: piece.clone(),
            reuse: Some(stale.clone()),
        }],
        ..ReceiveOptions::default()
    };
    let (received, _) = send_files_to(&lab, &[&a, &b], &out, &options).await;
    let total = (a_bytes.len() + b_bytes.len()) as u64;
    assert_eq!(received.bytes_written, total);
    assert!(
        std::fs::read(&piece).unwrap() == b_bytes,
        "the piece is not the second file"
    );
    let output = std::fs::read(&out).unwrap();
    assert_eq!(output.len() as u64, total);
    assert!(
        output[..a_bytes.len()] == a_bytes[..],
        "the output lost the first file"
    );
    assert!(
        output[a_bytes.len()..].iter().all(|&b| b == 0),
        "the piece's range of the output is not a hole"
    );
    assert!(!stale.exists(), "the stale file was left behind");
}

/// A migration's final round: the stream is a header, then the memory of an earlier round with
/// a few pages rewritten. Its memory goes to a file built over that round's output, whose
/// chunks the receiver kept (`keep_held`, then `held`): only the rewritten pages and the
/// header come over the wire, though the receiver's store is empty, and the rest is left where
/// it lies. The sender recorded the earlier round's cuts and takes those of the pages that did
/// not change instead of cutting and hashing them again.
#[tokio::test]
async fn a_file_built_over_a_held_output_gets_only_what_changed() {
    let lab = Lab::new();
    let memory = lab.path("memory.bin");
    write_source(&memory, 6 << 20, 7);
    let first = lab.path("round1.bin");
    let keep = ReceiveOptions {
        keep_held: true,
        ..ReceiveOptions::default()
    };
    let record = SendOptions {
        record_cuts: true,
        ..SendOptions::default()
    };
    let (received, sent) = send_with(&lab, lab.store(), &[&memory], &first, &keep, &record).await;
    let memory_len = std::fs::metadata(&memory).unwrap().len();
    let earlier = SendOptions {
        earlier: vec![EarlierFile {
            current: memory.clone(),
            cuts: per_file(&sent.cuts, &[memory_len]).swap_remove(0),
        }],
        ..SendOptions::default()
    };
    let held = received
        .held
        .expect("the receiver kept the output's chunks");
    assert_eq!(held.path(), first);
    assert!(!held.is_empty());

    // Three pages rewritten, past the first chunks, and a header in front of it all.
    let mut bytes = std::fs::read(&memory).unwrap();
    for page in [300usize, 700, 1100] {
        bytes[page * 4096..(page + 1) * 4096].fill(0x5a);
    }
    std::fs::write(&memory, &bytes).unwrap();
    let header = lab.path("header.bin");
    std::fs::write(&header, vec![b'h'; 3000]).unwrap();
    let pages = lab.path("pages.bin");
    let options = ReceiveOptions {
        held: Some(Arc::new(held)),
        pieces: vec![quic::Piece {
            offset: 3000,
            len: bytes.len() as u64,
            path: pages.clone(),
            reuse: Some(first.clone()),
        }],
        ..ReceiveOptions::default()
    };
    let empty = Arc::new(DiskStore::open(&lab.path("empty-store"), None).unwrap());
    let out = lab.path("final.tar");
    let (received, sent) =
        send_with(&lab, empty, &[&header, &memory], &out, &options, &earlier).await;
    assert!(std::fs::read(&pages).unwrap() == bytes, "the pages differ");
    assert!(
        sent.earlier_bytes * 10 > memory_len * 6 && sent.earlier_bytes < memory_len,
        "{} of {memory_len} bytes had their cuts taken from the earlier round",
        sent.earlier_bytes
    );
    assert!(
        received.chunks_in_place * 10 > received.chunks * 6,
        "only {} of {} chunks were found in place",
        received.chunks_in_place,
        received.chunks
    );
    assert!(
        sent.wire_bytes * 10 < sent.input_bytes,
        "{} bytes of {} went over the wire",
        sent.wire_bytes,
        sent.input_bytes
    );
    assert!(!first.exists(), "the earlier output was left behind");
}

/// Forwards UDP between clients and one server; while `dark` is set it drops everything.
struct Proxy {
    addr: SocketAddr,
    dark: Arc<AtomicBool>,
    /// Set when a client sends a QUIC Initial packet while the link is dark: it is reconnecting.
    reconnecting: Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(server: SocketAddr) -> Proxy {
        let front = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
        let addr = front.local_addr().unwrap();
        let dark = Arc::new(AtomicBool::new(false));
        let reconnecting = Arc::new(tokio::sync::Notify::new());
        let (d, r) = (dark.clone(), reconnecting.clone());
        tokio::spawn(async move {
            let mut backs: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> =
                Default::default();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, client) = front.recv_from(&mut buf).await.unwrap();
                let initial = n > 0 && buf[0] & 0xf0 == 0xc0;
                if d.load(Ordering::SeqCst) {
                    if initial {
                        r.notify_one();
                    }
                    continue;
                }
                let back = match backs.get(&client) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
                        b.connect(server).await.unwrap();
                        let (b2, f2, d2) = (b.clone(), front.clone(), d.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if !d2.load(Ordering::SeqCst) {
                                    let _ = f2.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        backs.insert(client, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Proxy {
            addr,
            dark,
            reconnecting,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_dark_is_resumed_without_resending_stored_chunks() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 48 << 20, 2);
    let unique = unique_nonzero_chunks(&src);
    let store = lab.store();
    let idle = Duration::from_millis(800);
    let server = quic::server_endpoint(&lab.receiver, loopback(), idle).unwrap();
    let proxy = Proxy::start(server.local_addr().unwrap()).await;
    let client = quic::client_endpoint(&lab.sender, None, idle).unwrap();
    let out = lab.path("out.bin");

    let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
    let sending = quic::send_file(&client, proxy.addr, &src, &SEND);
    let stored_before_drop = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let saboteur = {
        let (store, dark, reconnecting, stored) = (
            store.clone(),
            proxy.dark.clone(),
            proxy.reconnecting.clone(),
            stored_before_drop.clone(),
        );
        async move {
            // Let a quarter of the chunks land, then cut the link until the sender reconnects.
            while store.len() < unique / 4 {
                tokio::task::yield_now().await;
            }
            dark.store(true, Ordering::SeqCst);
            stored.store(store.len(), Ordering::SeqCst);
            reconnecting.notified().await;
            dark.store(false, Ordering::SeqCst);
        }
    };
    let (received, sent, ()) = timeout(DEADLINE, async {
        tokio::join!(receiving, sending, saboteur)
    })
    .await
    .expect("the transfer resumed and finished");
    let (received, sent) = (received.unwrap(), sent.unwrap());
    assert!(same_file(&src, &out));
    assert!(sent.connections >= 2, "the sender reconnected");
    assert!(
        received.connections >= 2,
        "the receiver accepted the resumed connection"
    );
    let stored = stored_before_drop.load(Ordering::SeqCst);
    assert!(stored >= unique / 4);
    // The final connection carried only what the store lacked when it began.
    assert!(
        received.chunks_received as usize <= unique - stored,
        "{} chunks re-sent although {stored} of {unique} were stored",
        received.chunks_received
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_with_a_foreign_certificate_is_refused_before_any_data() {
    let lab = Lab::new();
    let foreign_dirs = init_certs(&lab.path("other-ca"), &["sender".into()]).unwrap();
    let foreign = NodeIdentity::load(&foreign_dirs[0]).unwrap();
    let src = lab.path("src.bin");
    write_source(&src, 4 << 20, 3);
    let store = lab.store();
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let out = lab.path("out.bin");
    let receiving = tokio::spawn({
        let (server, store, out) = (server.clone(), store.clone(), out.clone());
        async move { quic::receive_file(&server, store, &out, &RECEIVE).await }
    });

    let intruder = quic::client_endpoint(&foreign, None, quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let err = timeout(DEADLINE, quic::send_file(&intruder, addr, &src, &SEND))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransferError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("same cluster CA"), "{err}");
    assert!(store.is_empty(), "no chunk may arrive from a refused peer");
    assert!(!out.exists());

    // The receiver is still waiting, and a sender of the cluster gets through.
    let client = quic::client_endpoint(&lab.sender, None, quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    timeout(DEADLINE, quic::send_file(&client, addr, &src, &SEND))
        .await
        .unwrap()
        .unwrap();
    timeout(DEADLINE, receiving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(same_file(&src, &out));
}

/// A peer with a valid certificate that speaks the protocol badly: it writes `control` frames
/// (then raw `control_tail` bytes) on the control stream and `chunks` on a chunk stream. Returns
/// the receiver's error, after checking nothing was left behind.
async fn hostile_session(
    control: Vec<Frame>,
    control_tail: &[u8],
    chunks: Vec<Frame>,
) -> TransferError {
    let lab = Lab::new();
    let store = lab.store();
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let out = lab.path("out.bin");
    let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
    let client = quic::client_endpoint(&lab.sender, None, quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let attack = async {
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut buf = BytesMut::new();
        for f in &control {
            f.encode(&mut buf);
        }
        buf.extend_from_slice(control_tail);
        send.write_all(&buf).await.unwrap();
        if !chunks.is_empty() {
            // Like a real sender, wait to be asked: a chunk before its Need is refused anyway.
            let mut inbox = BytesMut::new();
            loop {
                match transport::frame::decode(&mut inbox).unwrap() {
                    Some(Frame::Need { .. }) => break,
                    Some(_) => continue,
                    None => {
                        let chunk = recv
                            .read_chunk(4096, true)
                            .await
                            .unwrap()
                            .expect("receiver answers");
                        inbox.extend_from_slice(&chunk.bytes);
                    }
                }
            }
            let mut uni = conn.open_uni().await.unwrap();
            let mut buf = BytesMut::new();
            for f in &chunks {
                f.encode(&mut buf);
            }
            uni.write_all(&buf).await.unwrap();
        }
        // Keep the connection open until the receiver gives up on us.
        conn.closed().await
    };
    let (result, _) = timeout(DEADLINE, async { tokio::join!(receiving, attack) })
        .await
        .unwrap();
    let err = result.unwrap_err();
    assert!(
        store.is_empty(),
        "a refused chunk must never reach the store"
    );
    assert!(
        !out.exists() && !lab.path("out.bin.partial").exists(),
        "no half-made output"
    );
    err
}

fn entry_for(data: &[u8]) -> ManifestEntry {
    ManifestEntry {
        id: ChunkId::of(data),
        len: data.len() as u32,
        zero: false,
    }
}

/// A one-chunk stream announcing `claimed`, whose chunk arrives as `encoding` + `payload`.
async fn one_bad_chunk(claimed: &[u8], encoding: u8, payload: Vec<u8>) -> TransferError {
    let e = entry_for(claimed);
    hostile_session(
        vec![
            Frame::Hello {
                version: VERSION,
                stream_len: claimed.len() as u64,
            },
            Frame::Manifest {
                first_index: 0,
                entries: vec![e],
            },
        ],
        &[],
        vec![Frame::Chunk {
            id: e.id,
            raw_len: e.len,
            encoding,
            payload: payload.into(),
        }],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_does_not_match_its_id_is_refused() {
    let err = one_bad_chunk(&[7u8; 1000], 0, vec![8u8; 1000]).await;
    match err {
        TransferError::Protocol(ProtocolError::Local { ref message, .. }) => {
            assert!(message.contains("refused"), "{message}")
        }
        other => panic!("expected a bad-chunk error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_is_refused() {
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 19).unwrap();
    let err = one_bad_chunk(&[1u8; 4096], 1, bomb).await;
    assert!(
        matches!(err, TransferError::Protocol(ProtocolError::Local { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_with_another_manifest_digest_is_refused() {
    // One zero entry, listed correctly, then an End whose digest names another manifest.
    let zeros = ManifestEntry {
        id: ChunkId::of(&[0u8; 4096]),
        len: 4096,
        zero: true,
    };
    let mut other = ManifestDigest::new();
    other.push(1, &zeros);
    let err = hostile_session(
        vec![
            Frame::Hello {
                version: VERSION,
                stream_len: 4096,
            },
            Frame::Manifest {
                first_index: 0,
                entries: vec![zeros],
            },
            Frame::End {
                total_len: 4096,
                entries: 1,
                manifest_digest: other.digest(),
            },
        ],
        &[],
        vec![],
    )
    .await;
    let mut placed = ManifestDigest::new();
    placed.push(0, &zeros);
    match err {
        TransferError::Protocol(ProtocolError::ManifestMismatch { expected, actual }) => {
            assert_eq!(expected, other.digest());
            assert_eq!(actual, placed.digest());
        }
        other => panic!("expected a manifest digest mismatch, got {other}"),
    }
}

/// Flips a byte in the payload of `id`'s record in the store's committed packs (the layout is
/// documented in `transport::store`: magic `CKR1`, id, encoding, raw length, payload length,
/// payload). Returns how many records it damaged.
fn corrupt_stored_chunk(store_root: &Path, id: &ChunkId) -> usize {
    let mut damaged = 0;
    for pack in std::fs::read_dir(store_root.join("packs")).unwrap() {
        let path = pack.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let mut from = 0;
        while let Some(at) = bytes[from..].windows(32).position(|w| w == id.0) {
            let id_at = from + at;
            from = id_at + 32;
            if id_at < 4 || &bytes[id_at - 4..id_at] != b"CKR1" {
                continue; // the id's bytes inside some payload, not a record header
            }
            let len_at = id_at + 32 + 1 + 4;
            let payload_len =
                u32::from_le_bytes(bytes[len_at..len_at + 4].try_into().unwrap()) as usize;
            bytes[len_at + 4 + payload_len / 2] ^= 0x5a;
            damaged += 1;
        }
        if damaged > 0 {
            std::fs::write(&path, &bytes).unwrap();
        }
    }
    damaged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_store_holds_a_corrupted_chunk_refuses_to_produce_the_output() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 8 << 20, 5);
    let store = lab.store();
    // The receiver already holds every chunk of the file, so nothing but the manifest comes
    // over the wire and every byte of the output would be copied from the store...
    let ingested = ingest_file(&store, &src, 1).unwrap();
    assert!(ingested.chunks_added > 2);
    // ...but one chunk's record rotted on disk since. The store only notices when it reads it.
    let victim = Chunker::new(std::fs::File::open(&src).unwrap())
        .map(|s| s.unwrap().entry)
        .filter(|e| !e.zero)
        .nth(1)
        .unwrap();
    assert_eq!(corrupt_stored_chunk(store.root(), &victim.id), 1);
    assert!(store.contains(&victim.id), "the index still lists it");

    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let client = quic::client_endpoint(&lab.sender, None, quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let out = lab.path("out.bin");
    let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
    let sending = quic::send_file(&client, addr, &src, &SEND);
    let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
        .await
        .unwrap();
    match received.unwrap_err() {
        TransferError::Protocol(ProtocolError::Local { code, message }) => {
            assert_eq!(code, AbortCode::Io);
            assert!(message.contains(&victim.id.to_string()), "{message}");
            assert!(message.contains("failed verification"), "{message}");
        }
        other => panic!("expected the store copy to fail, got {other}"),
    }
    match sent.unwrap_err() {
        TransferError::Protocol(ProtocolError::PeerAborted { code, message }) => {
            assert_eq!(code, AbortCode::Io);
            assert!(message.contains(&victim.id.to_string()), "{message}");
        }
        other => panic!("the sender should hear why: {other}"),
    }
    assert!(
        !out.exists() && !lab.path("out.bin.partial").exists(),
        "no output from a store that failed verification"
    );
    assert!(
        !store.contains(&victim.id),
        "the corrupt record left the index"
    );

    // The next attempt fetches that one chunk and completes.
    let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
    let sending = quic::send_file(&client, addr, &src, &SEND);
    let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
        .await
        .unwrap();
    let (received, sent) = (received.unwrap(), sent.unwrap());
    assert_eq!(sent.chunks_sent, 1);
    assert_eq!(received.chunks_received, 1);
    assert!(same_file(&src, &out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_the_transfer() {
    // A Chunk header claiming 16 MiB: refused from its five header bytes.
    let header = [0x05, 0, 0, 0, 0x01];
    let err = hostile_session(
        vec![Frame::Hello {
            version: VERSION,
            stream_len: 10,
        }],
        &header,
        vec![],
    )
    .await;
    assert!(matches!(err, TransferError::Frame { .. }), "{err}");
    assert!(err.to_string().contains("more than"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_frame_type_closes_the_transfer() {
    let err = hostile_session(vec![], &[0x7f, 1, 0, 0, 0, 0], vec![]).await;
    assert!(err.to_string().contains("unknown frame type"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused() {
    let err = hostile_session(
        vec![Frame::Hello {
            version: VERSION + 1,
            stream_len: 10,
        }],
        &[],
        vec![],
    )
    .await;
    assert!(
        matches!(err, TransferError::Protocol(ProtocolError::Version { .. })),
        "{err}"
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. Needs root (CI runs as
/// root); elsewhere the test that uses it fails with the reason instead of passing vacuously.
struct TinyDisk {
    dir: TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed: this test needs root to fake a full disk"
        );
        TinyDisk { dir }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_receiver_fails_both_sides_with_a_clear_error() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 16 << 20, 4);
    let disk = TinyDisk::mount("2M");
    let store = Arc::new(DiskStore::open(&disk.dir.path().join("store"), None).unwrap());
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let client = quic::client_endpoint(&lab.sender, None, quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let out = lab.path("out.bin");
    let receiving = quic::receive_file(&server, store.clone(), &out, &RECEIVE);
    let sending = quic::send_file(&client, addr, &src, &SEND);
    let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
        .await
        .unwrap();
    let received = received.unwrap_err();
    assert!(
        received
            .to_string()
            .contains("disk holding the chunk store is full"),
        "{received}"
    );
    match sent.unwrap_err() {
        TransferError::Protocol(ProtocolError::PeerAborted { code, message }) => {
            assert_eq!(code, transport::frame::AbortCode::NoSpace);
            assert!(message.contains("full"), "{message}");
        }
        other => panic!("the sender should hear why: {other}"),
    }
    assert!(
        !out.exists() && !lab.path("out.bin.partial").exists(),
        "no half-made output"
    );
    let left: Vec<_> = std::fs::read_dir(disk.dir.path().join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// A receiver that dies mid-transfer, as when its process is killed (its runtime, endpoint and
/// socket vanish at once, with no CONNECTION_CLOSE): the sender gives up once the connection
/// times out and no new one comes. (The hang this guards against, a send into a full chunk
/// queue whose workers had all failed, depends on timing this test does not force; the e2e
/// test that kills a destination daemon mid-transfer caught it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_vanishes_fails_the_sender_in_time() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    // Noise: nothing compresses, so the sender has far more to send than the windows hold.
    {
        let mut rng = fastrand::Rng::with_seed(9);
        let noise: Vec<u8> = (0..(192 << 20)).map(|_| rng.u8(..)).collect();
        std::fs::write(&src, noise).unwrap();
    }
    let idle = Duration::from_millis(1500);
    // The receiver lives in its own runtime, on its own thread: shutting that runtime down
    // stops everything it does at once, like a killed process.
    let receiver_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = {
        let _guard = receiver_rt.enter();
        quic::server_endpoint(&lab.receiver, loopback(), idle).unwrap()
    };
    let addr = server.local_addr().unwrap();
    {
        let (server, store, out) = (server.clone(), lab.store(), lab.path("out.bin"));
        receiver_rt.spawn(async move {
            let _ = quic::receive_file(&server, store, &out, &RECEIVE).await;
        });
    }
    drop(server);
    let client = quic::client_endpoint(&lab.sender, None, idle).unwrap();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = SendOptions {
        resume_timeout: Duration::from_secs(2),
        progress: Some(progress.clone()),
        ..SendOptions::default()
    };
    let sending = quic::send_file(&client, addr, &src, &options);
    let kill = async {
        while progress.load(Ordering::SeqCst) < (16 << 20) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        receiver_rt.shutdown_background();
    };
    let (sent, ()) = timeout(DEADLINE, async { tokio::join!(sending, kill) })
        .await
        .expect("the sender is still waiting for a receiver that is gone");
    let err = sent.expect_err("the transfer cannot have finished");
    assert!(
        matches!(
            err,
            TransferError::Lost { .. } | TransferError::Unreachable { .. }
        ),
        "{err}"
    );
}
