//! The protocol over a simulated link with a fake clock: frames take time to arrive, chunk
//! streams overtake each other, connections die mid-transfer and are resumed, peers go silent
//! or misbehave. Everything here is deterministic from a seed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::frame::{AbortCode, Frame, VERSION};
use crate::ManifestEntry;

const CHUNK: usize = 8 * 1024;

/// A source stream cut into fixed-size chunks (the protocol does not care how cuts are made).
struct Source {
    data: Vec<u8>,
    spans: Vec<(u64, ManifestEntry)>,
}

impl Source {
    /// `len` bytes of runs: zeros, a few repeated blocks, and unique noise.
    fn generate(rng: &mut fastrand::Rng, len: usize) -> Source {
        let blocks: Vec<Vec<u8>> = (0..4)
            .map(|_| (0..CHUNK).map(|_| rng.u8(..)).collect())
            .collect();
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            match rng.u8(..4) {
                0 => data.extend(std::iter::repeat_n(0u8, CHUNK * rng.usize(1..4))),
                1 => data.extend_from_slice(&blocks[rng.usize(..blocks.len())]),
                _ => data.extend((0..CHUNK).map(|_| rng.u8(..))),
            }
        }
        data.truncate(len);
        Source::from_data(data)
    }

    fn from_data(data: Vec<u8>) -> Source {
        let spans = data
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| {
                let entry = ManifestEntry {
                    id: ChunkId::of(c),
                    len: c.len() as u32,
                    zero: c.iter().all(|&b| b == 0),
                };
                ((i * CHUNK) as u64, entry)
            })
            .collect();
        Source { data, spans }
    }

    fn unique_nonzero_chunks(&self) -> usize {
        let mut ids: Vec<_> = self
            .spans
            .iter()
            .filter(|(_, e)| !e.zero)
            .map(|(_, e)| e.id)
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    }
}

/// Where a frame travels: the two control directions, or one of the chunk streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    ToReceiver,
    ToSender,
    Chunks(usize),
}

/// A link with per-lane ordering, latency with jitter, and a fake clock.
struct Link {
    rng: fastrand::Rng,
    now: Instant,
    latency: Duration,
    jitter: Duration,
    /// Per lane: (delivery time, frame), delivery times non-decreasing within a lane.
    lanes: HashMap<LaneKey, VecDeque<(Instant, Frame)>>,
    /// Probability that a delivery kills the connection.
    drop_chance: f64,
    /// Silent from this instant on: nothing more is delivered.
    stall_at: Option<Instant>,
    /// Alters frames on their way to the receiver (a corrupting middlebox, or a sender bug).
    tamper: Option<Tamper>,
}

/// Changes a frame in flight.
type Tamper = Box<dyn FnMut(&mut Frame)>;

type LaneKey = (u8, usize);

fn key(lane: Lane) -> LaneKey {
    match lane {
        Lane::ToReceiver => (0, 0),
        Lane::ToSender => (1, 0),
        Lane::Chunks(i) => (2, i),
    }
}

fn lane_of(k: LaneKey) -> Lane {
    match k {
        (0, _) => Lane::ToReceiver,
        (1, _) => Lane::ToSender,
        (_, i) => Lane::Chunks(i),
    }
}

impl Link {
    fn new(seed: u64, drop_chance: f64) -> Link {
        Link {
            rng: fastrand::Rng::with_seed(seed),
            now: Instant::now(),
            latency: Duration::from_micros(200),
            jitter: Duration::from_micros(800),
            lanes: HashMap::new(),
            drop_chance,
            stall_at: None,
            tamper: None,
        }
    }

    fn send(&mut self, lane: Lane, mut frame: Frame) {
        if let (Lane::ToReceiver, Some(tamper)) = (lane, &mut self.tamper) {
            tamper(&mut frame);
        }
        let jitter = self.jitter.mul_f64(self.rng.f64());
        let q = self.lanes.entry(key(lane)).or_default();
        let earliest = q.back().map_or(self.now, |(t, _)| *t);
        q.push_back(((self.now + self.latency + jitter).max(earliest), frame));
    }

    /// The next frame due, advancing the clock to it; `None` when nothing is in flight.
    fn next(&mut self) -> Option<(Lane, Frame)> {
        let (k, due) = self
            .lanes
            .iter()
            .filter_map(|(k, q)| q.front().map(|(t, _)| (*k, *t)))
            .min_by_key(|(k, t)| (*t, *k))?;
        if self.stall_at.is_some_and(|s| due >= s) {
            return None;
        }
        self.now = self.now.max(due);
        let (_, frame) = self.lanes.get_mut(&k).unwrap().pop_front().unwrap();
        Some((lane_of(k), frame))
    }

    fn connection_dies(&mut self) -> bool {
        self.rng.f64() < self.drop_chance
    }

    /// Loses everything in flight (the connection died).
    fn reset(&mut self) -> usize {
        let lost = self
            .lanes
            .iter()
            .filter(|(k, _)| k.0 == 2)
            .map(|(_, q)| q.len())
            .sum();
        self.lanes.clear();
        lost
    }
}

/// What one simulated session ended with.
#[derive(Debug)]
enum Outcome {
    Done {
        sent: SenderStats,
        received: ReceiverStats,
    },
    ConnectionLost {
        sent: SenderStats,
    },
    Failed {
        sender: Option<ProtocolError>,
        receiver: Option<ProtocolError>,
    },
}

/// Runs one session over `link`, with the receiver's store persisting in `store`.
fn run_session(
    link: &mut Link,
    source: &Source,
    store: &mut HashMap<ChunkId, Vec<u8>>,
    output: &mut Vec<u8>,
    streams: usize,
) -> Outcome {
    let cfg = SenderConfig {
        batch_entries: 16,
        max_batches_in_flight: 3,
        idle_timeout: Duration::from_secs(5),
    };
    let mut sender = Sender::new(cfg, source.data.len() as u64, link.now);
    let mut receiver = Receiver::new(ReceiverConfig::default(), link.now);
    let mut input = source.spans.iter();
    let mut next_stream = 0;
    // Chunk bytes written into the output, as a driver counts them for `finish`.
    let mut written = 0u64;
    output.clear();
    loop {
        // Sender: feed input while the window allows, then flush frames and chunks.
        while sender.wants_input() {
            match input.next() {
                Some((offset, entry)) => sender.push_entry(*offset, *entry),
                None => sender.finish_input(source.data.len() as u64),
            }
        }
        while let Some(f) = sender.poll_transmit() {
            link.send(Lane::ToReceiver, f);
        }
        while let Some(req) = sender.poll_chunk() {
            let start = req.offset as usize;
            let raw = &source.data[start..start + req.len as usize];
            link.send(
                Lane::Chunks(next_stream % streams),
                Frame::Chunk {
                    id: req.id,
                    raw_len: req.len,
                    encoding: 0,
                    payload: Bytes::copy_from_slice(raw),
                },
            );
            next_stream += 1;
        }
        // Receiver: copies from the store, verification, outgoing frames.
        while let Some(copy) = receiver.poll_copy() {
            let raw = store
                .get(&copy.id)
                .expect("copy of a chunk the store lacks")
                .clone();
            for off in copy.offsets {
                write_at(output, off, &raw);
                written += raw.len() as u64;
            }
        }
        if receiver.ready_to_finish() {
            output.resize(receiver.total_len().unwrap() as usize, 0);
            let _ = receiver.finish(written);
        }
        while let Some(f) = receiver.poll_transmit() {
            link.send(Lane::ToSender, f);
        }
        if sender.is_done() {
            assert!(receiver.is_done());
            return Outcome::Done {
                sent: sender.stats(),
                received: receiver.stats(),
            };
        }
        if sender.error().is_some() || receiver.error().is_some() {
            // Let the aborts reach the other side, then report both views.
            while let Some((lane, frame)) = link.next() {
                match lane {
                    Lane::ToSender => {
                        let _ = sender.handle_frame(frame, link.now);
                    }
                    Lane::ToReceiver => {
                        let _ = receiver.handle_frame(frame, &|_| false, link.now);
                    }
                    Lane::Chunks(_) => {}
                }
            }
            return Outcome::Failed {
                sender: sender.error().cloned(),
                receiver: receiver.error().cloned(),
            };
        }
        // Deliver the next frame, or let the clock run to the next timeout.
        let Some((lane, frame)) = link.next() else {
            let deadline = [sender.poll_timeout(), receiver.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .expect("a stuck session must be waiting on a timeout");
            link.now = link.now.max(deadline);
            sender.handle_timeout(link.now);
            receiver.handle_timeout(link.now);
            continue;
        };
        if link.connection_dies() {
            link.reset();
            return Outcome::ConnectionLost {
                sent: sender.stats(),
            };
        }
        let now = link.now;
        match (lane, frame) {
            (Lane::ToSender, f) => {
                let _ = sender.handle_frame(f, now);
            }
            (Lane::ToReceiver, f) => {
                let _ = receiver.handle_frame(f, &|id| store.contains_key(id), now);
            }
            (
                Lane::Chunks(_),
                Frame::Chunk {
                    id,
                    raw_len,
                    payload,
                    ..
                },
            ) => {
                if receiver.accept_chunk(&id, raw_len, now).is_ok() {
                    // The driver verifies before storing: a bad chunk never enters the store.
                    if ChunkId::of(&payload) != id {
                        receiver.fail(ProtocolError::Local {
                            code: AbortCode::BadChunk,
                            message: format!("chunk {id} does not hash to its id"),
                        });
                        continue;
                    }
                    store.insert(id, payload.to_vec());
                    for off in receiver.chunk_stored(&id) {
                        write_at(output, off, &payload);
                        written += payload.len() as u64;
                    }
                }
            }
            (Lane::Chunks(_), other) => panic!("non-chunk frame {other:?} on a chunk lane"),
        }
    }
}

fn write_at(output: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if output.len() < end {
        output.resize(end, 0);
    }
    output[off as usize..end].copy_from_slice(data);
}

#[test]
fn clean_link_moves_each_unique_chunk_once() {
    let mut rng = fastrand::Rng::with_seed(1);
    let source = Source::generate(&mut rng, 3 * 1024 * 1024 + 123);
    let mut link = Link::new(2, 0.0);
    let (mut store, mut output) = (HashMap::new(), Vec::new());
    let Outcome::Done { sent, received } =
        run_session(&mut link, &source, &mut store, &mut output, 4)
    else {
        panic!("transfer failed");
    };
    assert_eq!(output, source.data);
    assert_eq!(sent.chunks as usize, source.spans.len());
    assert_eq!(sent.chunks_sent as usize, source.unique_nonzero_chunks());
    assert_eq!(received.chunks_received, sent.chunks_sent);
    assert_eq!(
        sent.chunks_reused + sent.chunks_sent,
        sent.chunks + (sent.chunks_sent - source.unique_nonzero_chunks() as u64)
    );

    // The same stream again: nothing but the manifest moves.
    let Outcome::Done { sent, .. } = run_session(&mut link, &source, &mut store, &mut output, 4)
    else {
        panic!("second transfer failed");
    };
    assert_eq!(output, source.data);
    assert_eq!(sent.chunks_sent, 0);
}

#[test]
fn dropped_connections_resume_without_resending_stored_chunks() {
    let mut resumed = 0;
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let source = Source::generate(&mut rng, 2 * 1024 * 1024);
        let mut link = Link::new(seed, 0.01);
        let (mut store, mut output) = (HashMap::new(), Vec::new());
        let mut sessions = 0;
        loop {
            sessions += 1;
            assert!(
                sessions < 500,
                "seed {seed}: no progress after {sessions} sessions"
            );
            let before = store.len();
            match run_session(&mut link, &source, &mut store, &mut output, 3) {
                Outcome::Done { sent, .. } => {
                    // The final session sent exactly what the store still lacked.
                    assert_eq!(
                        sent.chunks_sent as usize,
                        source.unique_nonzero_chunks() - before
                    );
                    break;
                }
                Outcome::ConnectionLost { sent } => {
                    // A resumed session never asks again for what reached the store.
                    assert!(sent.chunks_sent as usize <= source.unique_nonzero_chunks() - before);
                }
                Outcome::Failed { sender, receiver } => {
                    panic!("seed {seed}: {sender:?} {receiver:?}")
                }
            }
            link.drop_chance = (link.drop_chance * 0.8).max(0.0005);
        }
        assert_eq!(output, source.data, "seed {seed}");
        assert_eq!(store.len(), source.unique_nonzero_chunks());
        resumed += sessions - 1;
    }
    assert!(
        resumed >= 20,
        "only {resumed} drops in 20 transfers: the test proves little"
    );
}

#[test]
fn silent_peer_times_out_on_both_sides() {
    let mut rng = fastrand::Rng::with_seed(7);
    let source = Source::generate(&mut rng, 1024 * 1024);
    let mut link = Link::new(7, 0.0);
    link.stall_at = Some(link.now + Duration::from_micros(600));
    let (mut store, mut output) = (HashMap::new(), Vec::new());
    let start = link.now;
    match run_session(&mut link, &source, &mut store, &mut output, 2) {
        Outcome::Failed { sender, receiver } => {
            let timed_out =
                |e: &Option<ProtocolError>| matches!(e, Some(ProtocolError::Timeout { .. }));
            assert!(
                timed_out(&sender) || timed_out(&receiver),
                "{sender:?} {receiver:?}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        link.now - start >= Duration::from_secs(5),
        "timed out before the idle timeout"
    );
}

#[test]
fn empty_stream_completes() {
    let source = Source::from_data(Vec::new());
    let mut link = Link::new(3, 0.0);
    let (mut store, mut output) = (HashMap::new(), Vec::new());
    assert!(matches!(
        run_session(&mut link, &source, &mut store, &mut output, 1),
        Outcome::Done { .. }
    ));
    assert!(output.is_empty());
}

fn entry(byte: u8, len: u32) -> ManifestEntry {
    ManifestEntry::filled(byte, len)
}

fn welcomed_receiver(stream_len: u64) -> Receiver {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default(), now);
    r.handle_frame(
        Frame::Hello {
            version: VERSION,
            stream_len,
        },
        &|_| false,
        now,
    )
    .unwrap();
    assert!(matches!(r.poll_transmit(), Some(Frame::Welcome { .. })));
    r
}

fn assert_aborts(r: &mut Receiver, code: AbortCode) {
    match r.poll_transmit() {
        Some(Frame::Abort { code: c, .. }) => assert_eq!(c, code),
        other => panic!("expected Abort({code:?}), got {other:?}"),
    }
}

#[test]
fn receiver_refuses_another_version() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default(), now);
    let err = r
        .handle_frame(
            Frame::Hello {
                version: VERSION + 1,
                stream_len: 10,
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Version { .. }));
    assert_aborts(&mut r, AbortCode::Version);
}

#[test]
fn receiver_refuses_chunks_it_did_not_ask_for() {
    let now = Instant::now();
    let mut r = welcomed_receiver(100);
    let e = entry(1, 100);
    // The store already has it: not needed, so a Chunk frame for it is hostile.
    r.handle_frame(
        Frame::Manifest {
            first_index: 0,
            entries: vec![e],
        },
        &|_| true,
        now,
    )
    .unwrap();
    assert!(matches!(r.poll_transmit(), Some(Frame::Need { ref needed, .. }) if needed.is_empty()));
    assert_eq!(
        r.accept_chunk(&e.id, 100, now),
        Err(ProtocolError::UnexpectedChunk(e.id))
    );
    assert_aborts(&mut r, AbortCode::BadChunk);
}

#[test]
fn receiver_refuses_a_duplicate_or_resized_chunk() {
    let now = Instant::now();
    let mut r = welcomed_receiver(200);
    let (a, b) = (entry(1, 100), entry(2, 100));
    r.handle_frame(
        Frame::Manifest {
            first_index: 0,
            entries: vec![a, b],
        },
        &|_| false,
        now,
    )
    .unwrap();
    r.accept_chunk(&a.id, 100, now).unwrap();
    assert!(matches!(
        r.accept_chunk(&a.id, 100, now),
        Err(ProtocolError::UnexpectedChunk(_))
    ));

    let mut r = welcomed_receiver(200);
    r.handle_frame(
        Frame::Manifest {
            first_index: 0,
            entries: vec![a, b],
        },
        &|_| false,
        now,
    )
    .unwrap();
    assert!(matches!(
        r.accept_chunk(&b.id, 99, now),
        Err(ProtocolError::ChunkLength { .. })
    ));
}

#[test]
fn receiver_refuses_manifest_gaps_and_overlong_streams() {
    let now = Instant::now();
    let mut r = welcomed_receiver(1000);
    let err = r
        .handle_frame(
            Frame::Manifest {
                first_index: 5,
                entries: vec![entry(1, 10)],
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::OutOfOrder {
            expected: 0,
            got: 5,
            ..
        }
    ));

    let mut r = welcomed_receiver(150);
    let err = r
        .handle_frame(
            Frame::Manifest {
                first_index: 0,
                entries: vec![entry(1, 100), entry(2, 100)],
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::StreamTooLong {
            announced: 150,
            listed: 200
        }
    ));
}

/// A receiver whose manifest is one 100-byte zero chunk, its Need already taken.
fn receiver_with_one_zero_chunk(now: Instant) -> Receiver {
    let mut r = welcomed_receiver(100);
    r.handle_frame(
        Frame::Manifest {
            first_index: 0,
            entries: vec![entry(0, 100)],
        },
        &|_| false,
        now,
    )
    .unwrap();
    let _ = r.poll_transmit();
    r
}

/// The manifest digest of `entries` laid end to end from offset 0.
fn digest_of(entries: &[ManifestEntry]) -> ChunkId {
    let mut digest = crate::ManifestDigest::new();
    let mut offset = 0;
    for e in entries {
        digest.push(offset, e);
        offset += u64::from(e.len);
    }
    digest.digest()
}

#[test]
fn receiver_refuses_an_end_that_disagrees_with_the_manifest() {
    let now = Instant::now();
    let mut r = receiver_with_one_zero_chunk(now);
    let err = r
        .handle_frame(
            Frame::End {
                total_len: 100,
                entries: 2,
                manifest_digest: digest_of(&[entry(0, 100)]),
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::EndMismatch(_)), "{err}");
    assert_aborts(&mut r, AbortCode::Protocol);
}

#[test]
fn a_manifest_digest_mismatch_aborts_with_a_clear_error() {
    let now = Instant::now();
    let mut r = receiver_with_one_zero_chunk(now);
    // What a sender whose manifest had another entry at that place would announce.
    let sent = digest_of(&[entry(0, 99)]);
    let placed = digest_of(&[entry(0, 100)]);
    let err = r
        .handle_frame(
            Frame::End {
                total_len: 100,
                entries: 1,
                manifest_digest: sent,
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::ManifestMismatch {
            expected: sent,
            actual: placed,
        }
    );
    let message = err.to_string();
    assert!(message.contains("manifest digest mismatch"), "{message}");
    assert!(message.contains(&sent.to_string()), "{message}");
    assert!(message.contains(&placed.to_string()), "{message}");
    assert!(message.contains("output is refused"), "{message}");
    // Refused at End: never ready to finish, and the sender is told why.
    assert!(!r.ready_to_finish());
    match r.poll_transmit() {
        Some(Frame::Abort { code, message: m }) => {
            assert_eq!(code, AbortCode::HashMismatch);
            assert_eq!(m, message);
        }
        other => panic!("expected an Abort, got {other:?}"),
    }
    assert!(matches!(
        r.finish(0),
        Err(ProtocolError::ManifestMismatch { .. })
    ));
    assert!(r.poll_transmit().is_none(), "no Done after a mismatch");

    // The same End with the right digest is accepted.
    let mut r = receiver_with_one_zero_chunk(now);
    r.handle_frame(
        Frame::End {
            total_len: 100,
            entries: 1,
            manifest_digest: placed,
        },
        &|_| false,
        now,
    )
    .unwrap();
    assert!(r.ready_to_finish());
    r.finish(0).unwrap();
    assert!(matches!(
        r.poll_transmit(),
        Some(Frame::Done {
            bytes_written: 100,
            ..
        })
    ));
}

#[test]
fn a_manifest_altered_in_transit_is_refused_although_every_chunk_verifies() {
    // Two distinct non-zero chunks of the stream swap places in the manifest on the way: each
    // chunk still matches its id and the lengths still add up, so only the digest can tell.
    let mut rng = fastrand::Rng::with_seed(11);
    let source = Source::generate(&mut rng, 512 * 1024);
    let nonzero: Vec<usize> = (0..16).filter(|&i| !source.spans[i].1.zero).collect();
    assert!(nonzero.len() >= 2, "the first batch needs two data chunks");
    let (a, b) = (nonzero[0], nonzero[1]);
    assert_ne!(source.spans[a].1.id, source.spans[b].1.id);
    let mut link = Link::new(11, 0.0);
    link.tamper = Some(Box::new(move |frame| {
        if let Frame::Manifest {
            first_index: 0,
            entries,
        } = frame
        {
            entries.swap(a, b);
        }
    }));
    let (mut store, mut output) = (HashMap::new(), Vec::new());
    match run_session(&mut link, &source, &mut store, &mut output, 2) {
        Outcome::Failed { sender, receiver } => {
            assert!(
                matches!(receiver, Some(ProtocolError::ManifestMismatch { .. })),
                "{receiver:?}"
            );
            assert!(
                matches!(
                    sender,
                    Some(ProtocolError::PeerAborted {
                        code: AbortCode::HashMismatch,
                        ref message,
                    }) if message.contains("manifest digest mismatch")
                ),
                "{sender:?}"
            );
        }
        other => panic!("an altered manifest was accepted: {other:?}"),
    }

    // Without the tamper, the same stream goes through.
    let mut link = Link::new(11, 0.0);
    let (mut store, mut output) = (HashMap::new(), Vec::new());
    assert!(matches!(
        run_session(&mut link, &source, &mut store, &mut output, 2),
        Outcome::Done { .. }
    ));
    assert_eq!(output, source.data);
}

#[test]
fn receiver_refuses_a_zero_entry_whose_id_is_not_zeros() {
    let now = Instant::now();
    let mut r = welcomed_receiver(200);
    let lying = ManifestEntry {
        zero: true,
        ..entry(5, 100)
    };
    let err = r
        .handle_frame(
            Frame::Manifest {
                first_index: 0,
                entries: vec![entry(0, 100), lying],
            },
            &|_| false,
            now,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::BadZeroEntry {
            index: 1,
            len: 100,
            id: lying.id,
        }
    );
    assert_aborts(&mut r, AbortCode::Protocol);
}

/// Built over a file that held `a` at 0 and `b` at 100: `a` at 0 is in place (neither asked
/// for nor written), `a` at 200 and `b` at 0 of a second manifest are not; the kept chunks of
/// the new output say where each lies now.
#[test]
fn entries_found_in_place_are_neither_asked_for_nor_written() {
    let now = Instant::now();
    let (a, b, z) = (entry(1, 100), entry(2, 100), entry(0, 100));
    let mut old = Held::new(std::path::Path::new("old"));
    old.push(0, &a);
    old.push(100, &b);
    let in_place = InPlace {
        start: 0,
        len: None,
        held: std::sync::Arc::new(old),
    };
    let mut r = Receiver::new(ReceiverConfig::default(), now)
        .with_in_place(Some(in_place))
        .keeping_held(Some(std::path::Path::new("new")));
    for frame in [
        Frame::Hello {
            version: VERSION,
            stream_len: 400,
        },
        Frame::Manifest {
            first_index: 0,
            entries: vec![a, z, a, b],
        },
    ] {
        r.handle_frame(frame, &|_| false, now).unwrap();
    }
    let _ = r.poll_transmit();
    match r.poll_transmit() {
        Some(Frame::Need { needed, .. }) => assert_eq!(needed, vec![2, 3]),
        other => panic!("expected a Need, got {other:?}"),
    }
    for id in [a.id, b.id] {
        r.accept_chunk(&id, 100, now).unwrap();
    }
    assert_eq!(r.chunk_stored(&a.id), vec![200]);
    assert_eq!(r.chunk_stored(&b.id), vec![300]);
    r.handle_frame(
        Frame::End {
            total_len: 400,
            entries: 4,
            manifest_digest: digest_of(&[a, z, a, b]),
        },
        &|_| false,
        now,
    )
    .unwrap();
    assert_eq!(
        r.data_bytes(),
        200,
        "the entry in place is not to be written"
    );
    r.finish(200).unwrap();
    let stats = r.stats();
    assert_eq!((stats.chunks_in_place, stats.bytes_in_place), (1, 100));
    let mut new = Held::new(std::path::Path::new("new"));
    for (offset, e) in [(0, a), (100, z), (200, a), (300, b)] {
        new.push(offset, &e);
    }
    assert_eq!(r.take_held(), Some(new));
}

#[test]
fn receiver_refuses_to_finish_when_chunk_bytes_are_missing() {
    let now = Instant::now();
    let mut r = welcomed_receiver(300);
    let (a, z) = (entry(1, 100), entry(0, 100));
    r.handle_frame(
        Frame::Manifest {
            first_index: 0,
            entries: vec![a, z, a],
        },
        &|_| false,
        now,
    )
    .unwrap();
    let _ = r.poll_transmit();
    r.accept_chunk(&a.id, 100, now).unwrap();
    assert_eq!(r.chunk_stored(&a.id), vec![0, 200]);
    r.handle_frame(
        Frame::End {
            total_len: 300,
            entries: 3,
            manifest_digest: digest_of(&[a, z, a]),
        },
        &|_| false,
        now,
    )
    .unwrap();
    assert!(r.ready_to_finish());
    assert_eq!(r.data_bytes(), 200);
    // Only one of the two offsets was written.
    let err = r.finish(100).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::Incomplete {
            expected: 200,
            written: 100,
        }
    );
    assert_aborts(&mut r, AbortCode::Io);
    assert!(!r.is_done());
}

#[test]
fn sender_refuses_a_need_for_zero_or_unknown_entries() {
    let now = Instant::now();
    let cfg = SenderConfig {
        batch_entries: 2,
        ..SenderConfig::default()
    };
    let mut s = Sender::new(cfg.clone(), 200, now);
    s.push_entry(0, entry(0, 100));
    s.push_entry(100, entry(1, 100));
    s.handle_frame(Frame::Welcome { version: VERSION }, now)
        .unwrap();
    let err = s
        .handle_frame(
            Frame::Need {
                first_index: 0,
                count: 2,
                needed: vec![0],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::BadNeed(_)));

    let mut s = Sender::new(cfg, 200, now);
    s.push_entry(0, entry(1, 100));
    s.push_entry(100, entry(2, 100));
    s.handle_frame(Frame::Welcome { version: VERSION }, now)
        .unwrap();
    let err = s
        .handle_frame(
            Frame::Need {
                first_index: 2,
                count: 2,
                needed: vec![],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::OutOfOrder { .. }));
}

#[test]
fn sender_reports_the_receivers_abort() {
    let now = Instant::now();
    let mut s = Sender::new(SenderConfig::default(), 10, now);
    let err = s
        .handle_frame(
            Frame::Abort {
                code: AbortCode::NoSpace,
                message: "disk full".into(),
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::PeerAborted {
            code: AbortCode::NoSpace,
            ..
        }
    ));
    // No abort is echoed back to a peer that already gave up.
    assert!(matches!(s.poll_transmit(), Some(Frame::Hello { .. })));
    assert!(s.poll_transmit().is_none());
}
