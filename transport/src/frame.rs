//! The wire format, version 2: typed, length-prefixed frames with hard bounds on every length.
//!
//! Every frame is a one-byte type, a `u32` payload length, then exactly that many payload bytes.
//! All integers are little-endian. No payload is longer than [`MAX_FRAME_PAYLOAD`], and each type
//! has tighter bounds of its own (the "payload" column), so a header is judged on its five bytes
//! alone, before any of its payload is buffered: a peer can never make the decoder wait for, or
//! hold, more than [`HEADER_LEN`] + [`MAX_FRAME_PAYLOAD`] bytes.
//!
//! | type   | frame      | fields, in order                                                                 | payload bytes        |
//! |--------|------------|----------------------------------------------------------------------------------|----------------------|
//! | `0x01` | `Hello`    | magic `b"MGRT"`, version `u16`, stream_len `u64` (bytes the sender will stream)  | 14                   |
//! | `0x02` | `Welcome`  | version `u16`                                                                    | 2                    |
//! | `0x03` | `Manifest` | first_index `u64`, count `u32`, then count × (id `[u8; 32]`, len `u32`, flags `u8`) | 12 + 37 × count    |
//! | `0x04` | `Need`     | first_index `u64`, count `u32`, bitmap of ⌈count / 8⌉ bytes                      | 12 + ⌈count / 8⌉     |
//! | `0x05` | `Chunk`    | id `[u8; 32]`, raw_len `u32`, encoding `u8`, then the encoded chunk bytes        | 38 ..= 524288        |
//! | `0x06` | `End`      | total_len `u64`, entries `u64`, manifest_digest `[u8; 32]`                       | 48                   |
//! | `0x07` | `Done`     | bytes_written `u64`, chunks_received `u64`                                       | 16                   |
//! | `0x08` | `Abort`    | code `u16`, message (UTF-8)                                                      | 2 ..= 1026           |
//!
//! Rules beyond the table, all enforced by [`decode`] (and by [`Frame::validate`] before encoding):
//! - `Hello`: the magic must match; the version is *not* checked here, the protocol layer answers
//!   a version it does not speak with an `Abort` of code [`AbortCode::Version`].
//! - `Manifest` and `Need`: `count` is `1..=`[`MAX_BATCH_ENTRIES`] and `first_index + count` must
//!   not overflow `u64`. A manifest entry's `len` is `1..=`[`crate::MAX_CHUNK_LEN`]; bit 0 of its
//!   `flags` marks an all-zero chunk, the other seven bits are reserved and must be 0.
//! - `Need`: bit `i` of the bitmap (bit `i % 8`, least significant first, of byte `i / 8`) says
//!   that entry `first_index + i` is needed; the unused bits of the last byte must be 0.
//! - `Chunk`: `raw_len` is `1..=MAX_CHUNK_LEN`; `encoding` is 0 (raw) or 1 (zstd); the encoded
//!   bytes are never empty, and for raw encoding their length equals `raw_len`.
//! - `End`: `manifest_digest` is the [`crate::ManifestDigest`] of every entry the `Manifest`
//!   frames listed, in order, with its offset in the stream (the encoding is documented in
//!   [`crate::id`]); the receiver refuses the stream when the digest of what it assembled
//!   differs.
//! - `Abort`: the message is at most [`MAX_ABORT_MESSAGE`] bytes of valid UTF-8.
//! - An unknown type, or a payload with bytes missing or left over, is an error.
//!
//! Versions: 1 carried in `End` the blake3 of the whole stream, which made the sender hash
//! every byte twice (chunk ids and the stream) and the receiver read the whole output back to
//! hash it again; 2 carries the manifest digest instead. The frame layouts are otherwise
//! unchanged, so it is the version in `Hello` and `Welcome` that keeps a version-1 peer from
//! being misunderstood: it is refused with an `Abort` of code [`AbortCode::Version`].
//!
//! A decoding error leaves the buffer untouched, but the stream cannot be resynchronised after
//! one: the connection should be aborted.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::{ChunkId, ManifestEntry, MAX_CHUNK_LEN};

/// The protocol version this module speaks, as sent in `Hello` and `Welcome`.
pub const VERSION: u16 = 2;
/// The first four payload bytes of every `Hello`.
pub const MAGIC: [u8; 4] = *b"MGRT";
/// The largest payload any frame may declare.
pub const MAX_FRAME_PAYLOAD: usize = 512 * 1024;
/// The most entries one `Manifest` or `Need` frame covers.
pub const MAX_BATCH_ENTRIES: usize = 1024;
/// Length of the frame header: the type byte and the `u32` payload length.
pub const HEADER_LEN: usize = 5;
/// The longest `Abort` message, in bytes; [`Frame::encode`] truncates longer ones.
pub const MAX_ABORT_MESSAGE: usize = 1024;
/// `Chunk` encoding byte: the payload is the raw chunk.
pub const ENCODING_RAW: u8 = 0;
/// `Chunk` encoding byte: the payload is one zstd frame of the chunk.
pub const ENCODING_ZSTD: u8 = 1;

const TYPE_HELLO: u8 = 0x01;
const TYPE_WELCOME: u8 = 0x02;
const TYPE_MANIFEST: u8 = 0x03;
const TYPE_NEED: u8 = 0x04;
const TYPE_CHUNK: u8 = 0x05;
const TYPE_END: u8 = 0x06;
const TYPE_DONE: u8 = 0x07;
const TYPE_ABORT: u8 = 0x08;

const HELLO_LEN: usize = 4 + 2 + 8;
const WELCOME_LEN: usize = 2;
/// `first_index: u64` and `count: u32`, the head of `Manifest` and `Need`.
const BATCH_HEAD_LEN: usize = 8 + 4;
const MANIFEST_ENTRY_LEN: usize = 32 + 4 + 1;
/// `id`, `raw_len` and `encoding`, before a chunk's bytes.
const CHUNK_HEAD_LEN: usize = 32 + 4 + 1;
const END_LEN: usize = 8 + 8 + 32;
const DONE_LEN: usize = 8 + 8;
const ABORT_HEAD_LEN: usize = 2;

/// Manifest entry flag: the chunk is all zeros.
const FLAG_ZERO: u8 = 0x01;

/// Why a run of bytes is not a valid frame. Every variant is fatal to the stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The header declares a payload longer than [`MAX_FRAME_PAYLOAD`]; seen from the header
    /// alone, before any payload was buffered.
    #[error(
        "frame of type {frame_type:#04x} declares {len} bytes, more than the {max} allowed: \
         the peer is not speaking this protocol version or is hostile"
    )]
    TooLarge {
        /// The type byte of the header.
        frame_type: u8,
        /// The payload length the header declares.
        len: u32,
        /// The largest payload allowed, [`MAX_FRAME_PAYLOAD`].
        max: usize,
    },
    /// The type byte names no frame of this protocol version.
    #[error(
        "unknown frame type {0:#04x}: the peer is not speaking protocol version {VERSION} \
         or the stream is out of step"
    )]
    UnknownType(u8),
    /// The header declares a payload length this frame type can never have; seen from the
    /// header alone.
    #[error("{frame} frame declares a {len}-byte payload, but {}", describe_bounds(*.min, *.max))]
    BadLength {
        /// Which frame the type byte names.
        frame: &'static str,
        /// The payload length the header declares.
        len: u32,
        /// The shortest payload this frame type has.
        min: usize,
        /// The longest payload this frame type has.
        max: usize,
    },
    /// A `Hello` does not start with [`MAGIC`].
    #[error(
        "Hello frame starts with b\"{}\" instead of b\"MGRT\": the peer is not a migration endpoint",
        .found.escape_ascii()
    )]
    BadMagic {
        /// The four bytes found where the magic belongs.
        found: [u8; 4],
    },
    /// A payload breaks one of the format's rules: a field out of range, reserved bits set, a
    /// count that disagrees with the payload length, bytes missing or left over.
    #[error("malformed {frame} frame: {what}")]
    Malformed {
        /// Which frame.
        frame: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// An `Abort` message is not valid UTF-8.
    #[error("Abort frame message is not valid UTF-8 (invalid from byte {valid_up_to} on)")]
    BadUtf8 {
        /// Length of the longest valid UTF-8 prefix of the message.
        valid_up_to: usize,
    },
}

fn describe_bounds(min: usize, max: usize) -> String {
    if min == max {
        format!("its payload is always {min} bytes")
    } else {
        format!("its payload is {min} to {max} bytes")
    }
}

fn malformed(frame: &'static str, what: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        frame,
        what: what.into(),
    }
}

/// Why a transfer is being abandoned, as carried by an `Abort` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortCode {
    /// The peer broke the protocol (code 1).
    Protocol,
    /// The peer speaks a protocol version we do not (code 2).
    Version,
    /// A chunk failed to decode or had the wrong length (code 3).
    BadChunk,
    /// A chunk did not hash to its id, or the manifest the receiver assembled does not have
    /// the digest the sender announced (code 4).
    HashMismatch,
    /// The receiver ran out of disk space (code 5).
    NoSpace,
    /// A local IO error (code 6).
    Io,
    /// The transfer was cancelled by an operator or a shutdown (code 7).
    Cancelled,
    /// A code this version does not know. Build values with [`AbortCode::from_u16`], which never
    /// wraps a known code in `Other`.
    Other(u16),
}

impl AbortCode {
    /// The code for a wire value; unknown values become [`AbortCode::Other`].
    pub const fn from_u16(code: u16) -> Self {
        match code {
            1 => AbortCode::Protocol,
            2 => AbortCode::Version,
            3 => AbortCode::BadChunk,
            4 => AbortCode::HashMismatch,
            5 => AbortCode::NoSpace,
            6 => AbortCode::Io,
            7 => AbortCode::Cancelled,
            other => AbortCode::Other(other),
        }
    }

    /// The wire value.
    pub const fn as_u16(self) -> u16 {
        match self {
            AbortCode::Protocol => 1,
            AbortCode::Version => 2,
            AbortCode::BadChunk => 3,
            AbortCode::HashMismatch => 4,
            AbortCode::NoSpace => 5,
            AbortCode::Io => 6,
            AbortCode::Cancelled => 7,
            AbortCode::Other(code) => code,
        }
    }
}

impl From<u16> for AbortCode {
    fn from(code: u16) -> Self {
        AbortCode::from_u16(code)
    }
}

impl From<AbortCode> for u16 {
    fn from(code: AbortCode) -> Self {
        code.as_u16()
    }
}

impl std::fmt::Display for AbortCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortCode::Protocol => f.write_str("protocol error"),
            AbortCode::Version => f.write_str("unsupported protocol version"),
            AbortCode::BadChunk => f.write_str("bad chunk"),
            AbortCode::HashMismatch => f.write_str("hash mismatch"),
            AbortCode::NoSpace => f.write_str("no space left"),
            AbortCode::Io => f.write_str("IO error"),
            AbortCode::Cancelled => f.write_str("cancelled"),
            AbortCode::Other(code) => write!(f, "unknown abort code {code}"),
        }
    }
}

/// One message of the protocol. See the [module documentation](self) for the byte layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sender to receiver, first: who we are and how much is coming.
    Hello {
        /// The sender's protocol version (not checked by the decoder).
        version: u16,
        /// Bytes the sender will stream.
        stream_len: u64,
    },
    /// Receiver to sender: the version the receiver will speak.
    Welcome {
        /// The receiver's protocol version.
        version: u16,
    },
    /// Sender to receiver: the next batch of the stream's manifest.
    Manifest {
        /// Stream index of `entries[0]`.
        first_index: u64,
        /// `1..=MAX_BATCH_ENTRIES` entries, each of length `1..=MAX_CHUNK_LEN`.
        entries: Vec<ManifestEntry>,
    },
    /// Receiver to sender: which entries of a manifest batch it lacks.
    Need {
        /// Stream index of the batch's first entry.
        first_index: u64,
        /// Entries in the batch, `1..=MAX_BATCH_ENTRIES`.
        count: u32,
        /// Offsets `i` (entry `first_index + i`) that are needed, strictly ascending, each
        /// below `count`. May be empty.
        needed: Vec<u32>,
    },
    /// Sender to receiver: one chunk's bytes.
    Chunk {
        /// Content address of the raw bytes.
        id: ChunkId,
        /// Length of the raw bytes, `1..=MAX_CHUNK_LEN`.
        raw_len: u32,
        /// [`ENCODING_RAW`] or [`ENCODING_ZSTD`]; the codec module interprets it.
        encoding: u8,
        /// The encoded bytes, never empty. When decoded, a zero-copy slice of the read buffer.
        payload: Bytes,
    },
    /// Sender to receiver: the stream is complete.
    End {
        /// Bytes in the stream.
        total_len: u64,
        /// Manifest entries in the stream.
        entries: u64,
        /// [`crate::ManifestDigest`] of the stream's manifest, offsets included.
        manifest_digest: ChunkId,
    },
    /// Receiver to sender: everything is written and verified.
    Done {
        /// Bytes the receiver wrote.
        bytes_written: u64,
        /// Chunks that came over the wire (not those it already had).
        chunks_received: u64,
    },
    /// Either way: the transfer is abandoned.
    Abort {
        /// Why.
        code: AbortCode,
        /// Detail for humans; truncated to [`MAX_ABORT_MESSAGE`] bytes when encoded.
        message: String,
    },
}

impl Frame {
    /// The frame's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Manifest { .. } => "Manifest",
            Frame::Need { .. } => "Need",
            Frame::Chunk { .. } => "Chunk",
            Frame::End { .. } => "End",
            Frame::Done { .. } => "Done",
            Frame::Abort { .. } => "Abort",
        }
    }

    /// The type byte that starts the frame on the wire.
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello { .. } => TYPE_HELLO,
            Frame::Welcome { .. } => TYPE_WELCOME,
            Frame::Manifest { .. } => TYPE_MANIFEST,
            Frame::Need { .. } => TYPE_NEED,
            Frame::Chunk { .. } => TYPE_CHUNK,
            Frame::End { .. } => TYPE_END,
            Frame::Done { .. } => TYPE_DONE,
            Frame::Abort { .. } => TYPE_ABORT,
        }
    }

    /// Bytes [`Frame::encode`] appends: header and payload.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Frame::Hello { .. } => HELLO_LEN,
            Frame::Welcome { .. } => WELCOME_LEN,
            Frame::Manifest { entries, .. } => BATCH_HEAD_LEN + MANIFEST_ENTRY_LEN * entries.len(),
            Frame::Need { count, .. } => BATCH_HEAD_LEN + bitmap_len(*count as usize),
            Frame::Chunk { payload, .. } => CHUNK_HEAD_LEN + payload.len(),
            Frame::End { .. } => END_LEN,
            Frame::Done { .. } => DONE_LEN,
            Frame::Abort { message, .. } => ABORT_HEAD_LEN + truncate_message(message).len(),
        }
    }

    /// Checks the frame against every rule the decoder enforces (except the `Abort` message
    /// length: the encoder truncates long messages). A frame that passes encodes to bytes that
    /// [`decode`] turns back into an equal frame.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            Frame::Hello { .. }
            | Frame::Welcome { .. }
            | Frame::End { .. }
            | Frame::Done { .. }
            | Frame::Abort { .. } => Ok(()),
            Frame::Manifest {
                first_index,
                entries,
            } => {
                check_batch("Manifest", *first_index, entries.len())?;
                for (i, entry) in entries.iter().enumerate() {
                    check_entry_len(i, entry.len)?;
                }
                Ok(())
            }
            Frame::Need {
                first_index,
                count,
                needed,
            } => {
                check_batch("Need", *first_index, *count as usize)?;
                let mut next_allowed = 0u32;
                for &offset in needed {
                    if offset < next_allowed || offset >= *count {
                        return Err(malformed(
                            "Need",
                            format!(
                                "needed offsets must be strictly ascending and below the count \
                                 {count}; found {offset} after {next_allowed} were ruled out"
                            ),
                        ));
                    }
                    next_allowed = offset + 1;
                }
                Ok(())
            }
            Frame::Chunk {
                raw_len,
                encoding,
                payload,
                ..
            } => check_chunk(*raw_len, *encoding, payload.len()),
        }
    }

    /// Appends the frame's bytes to `out`.
    ///
    /// An `Abort` message longer than [`MAX_ABORT_MESSAGE`] bytes is cut at the last character
    /// boundary within the limit.
    ///
    /// # Panics
    ///
    /// If the frame breaks a rule of the format ([`Frame::validate`] fails): a peer would reject
    /// it, so building it is a bug of the caller's.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_into(out, true);
    }

    /// The frame's bytes in two parts, for a writer that sends the payload of a `Chunk` without
    /// copying it: everything before the chunk's payload, then the payload (shared, not
    /// copied). Any other frame comes whole in the first part. The parts joined are what
    /// [`Frame::encode`] appends; it panics likewise.
    pub fn encode_parts(&self) -> [Bytes; 2] {
        let mut head = BytesMut::new();
        self.encode_into(&mut head, false);
        let payload = match self {
            Frame::Chunk { payload, .. } => payload.clone(),
            _ => Bytes::new(),
        };
        [head.freeze(), payload]
    }

    /// Appends the frame's bytes, leaving out a `Chunk`'s payload unless `chunk_payload`.
    fn encode_into(&self, out: &mut BytesMut, chunk_payload: bool) {
        if let Err(error) = self.validate() {
            panic!(
                "refusing to encode an invalid {} frame: {error}",
                self.name()
            );
        }
        let payload_len = self.payload_len();
        // validate() bounds every payload far below u32::MAX.
        let wire_len = u32::try_from(payload_len).unwrap_or(u32::MAX);
        let left_out = match self {
            Frame::Chunk { payload, .. } if !chunk_payload => payload.len(),
            _ => 0,
        };
        out.reserve(HEADER_LEN + payload_len - left_out);
        out.put_u8(self.frame_type());
        out.put_u32_le(wire_len);
        match self {
            Frame::Hello {
                version,
                stream_len,
            } => {
                out.put_slice(&MAGIC);
                out.put_u16_le(*version);
                out.put_u64_le(*stream_len);
            }
            Frame::Welcome { version } => out.put_u16_le(*version),
            Frame::Manifest {
                first_index,
                entries,
            } => {
                out.put_u64_le(*first_index);
                out.put_u32_le(entries.len() as u32);
                for entry in entries {
                    out.put_slice(&entry.id.0);
                    out.put_u32_le(entry.len);
                    out.put_u8(if entry.zero { FLAG_ZERO } else { 0 });
                }
            }
            Frame::Need {
                first_index,
                count,
                needed,
            } => {
                out.put_u64_le(*first_index);
                out.put_u32_le(*count);
                let mut bitmap = vec![0u8; bitmap_len(*count as usize)];
                for &offset in needed {
                    if let Some(byte) = bitmap.get_mut(offset as usize / 8) {
                        *byte |= 1 << (offset % 8);
                    }
                }
                out.put_slice(&bitmap);
            }
            Frame::Chunk {
                id,
                raw_len,
                encoding,
                payload,
            } => {
                out.put_slice(&id.0);
                out.put_u32_le(*raw_len);
                out.put_u8(*encoding);
                if chunk_payload {
                    out.put_slice(payload);
                }
            }
            Frame::End {
                total_len,
                entries,
                manifest_digest,
            } => {
                out.put_u64_le(*total_len);
                out.put_u64_le(*entries);
                out.put_slice(&manifest_digest.0);
            }
            Frame::Done {
                bytes_written,
                chunks_received,
            } => {
                out.put_u64_le(*bytes_written);
                out.put_u64_le(*chunks_received);
            }
            Frame::Abort { code, message } => {
                out.put_u16_le(code.as_u16());
                out.put_slice(truncate_message(message).as_bytes());
            }
        }
    }
}

/// Pulls one complete frame off the front of `buf`, which the caller fills from the stream.
///
/// - `Ok(Some(frame))`: the frame's bytes are consumed. A `Chunk` payload is split off `buf`
///   without copying.
/// - `Ok(None)`: more bytes are needed ([`bytes_needed`] says how many); nothing is consumed. Once
///   a valid header is in, `buf` reserves room for the whole frame, at most
///   [`HEADER_LEN`] + [`MAX_FRAME_PAYLOAD`] bytes.
/// - `Err(_)`: the bytes are not a valid frame; nothing is consumed, and the stream cannot be
///   resynchronised. A bad header is reported as soon as its five bytes are in.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some((frame_type, payload_len)) = read_header(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + payload_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = parse_payload(frame_type, &buf[HEADER_LEN..total])?;
    if let Frame::Chunk { payload, .. } = &mut frame {
        buf.advance(HEADER_LEN + CHUNK_HEAD_LEN);
        *payload = buf.split_to(total - HEADER_LEN - CHUNK_HEAD_LEN).freeze();
    } else {
        buf.advance(total);
    }
    Ok(Some(frame))
}

/// How many more bytes `buf` needs before [`decode`] can make progress: the rest of the header,
/// or the rest of the frame once the header is in; 0 if a whole frame is there. Never more than
/// [`HEADER_LEN`] + [`MAX_FRAME_PAYLOAD`]. Fails, like [`decode`], on a bad header.
pub fn bytes_needed(buf: &[u8]) -> Result<usize, FrameError> {
    match read_header(buf)? {
        None => Ok(HEADER_LEN - buf.len()),
        Some((_, payload_len)) => Ok((HEADER_LEN + payload_len).saturating_sub(buf.len())),
    }
}

/// The frame name and inclusive payload-length bounds of a type byte; `None` if unknown.
fn payload_bounds(frame_type: u8) -> Option<(&'static str, usize, usize)> {
    Some(match frame_type {
        TYPE_HELLO => ("Hello", HELLO_LEN, HELLO_LEN),
        TYPE_WELCOME => ("Welcome", WELCOME_LEN, WELCOME_LEN),
        TYPE_MANIFEST => (
            "Manifest",
            BATCH_HEAD_LEN + MANIFEST_ENTRY_LEN,
            BATCH_HEAD_LEN + MANIFEST_ENTRY_LEN * MAX_BATCH_ENTRIES,
        ),
        TYPE_NEED => (
            "Need",
            BATCH_HEAD_LEN + 1,
            BATCH_HEAD_LEN + bitmap_len(MAX_BATCH_ENTRIES),
        ),
        TYPE_CHUNK => ("Chunk", CHUNK_HEAD_LEN + 1, MAX_FRAME_PAYLOAD),
        TYPE_END => ("End", END_LEN, END_LEN),
        TYPE_DONE => ("Done", DONE_LEN, DONE_LEN),
        TYPE_ABORT => ("Abort", ABORT_HEAD_LEN, ABORT_HEAD_LEN + MAX_ABORT_MESSAGE),
        _ => return None,
    })
}

/// Judges the header at the front of `buf`: `Ok(None)` if it is not all there yet, else the
/// type byte and the payload length, known to be within the type's bounds.
fn read_header(buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    let Some((&[frame_type, l0, l1, l2, l3], _)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let Some((frame, min, max)) = payload_bounds(frame_type) else {
        return Err(FrameError::UnknownType(frame_type));
    };
    let payload_len = usize::try_from(len).unwrap_or(usize::MAX);
    if payload_len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLarge {
            frame_type,
            len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    if payload_len < min || payload_len > max {
        return Err(FrameError::BadLength {
            frame,
            len,
            min,
            max,
        });
    }
    Ok(Some((frame_type, payload_len)))
}

/// Parses a payload whose length is within its type's bounds. A `Chunk` comes back with an
/// empty `payload`: [`decode`] fills it with a zero-copy split of its buffer.
fn parse_payload(frame_type: u8, payload: &[u8]) -> Result<Frame, FrameError> {
    match frame_type {
        TYPE_HELLO => {
            let mut r = Reader::new("Hello", payload);
            let magic = r.array::<4>("the magic")?;
            if magic != MAGIC {
                return Err(FrameError::BadMagic { found: magic });
            }
            let version = r.u16("the version")?;
            let stream_len = r.u64("the stream length")?;
            r.finish()?;
            Ok(Frame::Hello {
                version,
                stream_len,
            })
        }
        TYPE_WELCOME => {
            let mut r = Reader::new("Welcome", payload);
            let version = r.u16("the version")?;
            r.finish()?;
            Ok(Frame::Welcome { version })
        }
        TYPE_MANIFEST => parse_manifest(payload),
        TYPE_NEED => parse_need(payload),
        TYPE_CHUNK => {
            let mut r = Reader::new("Chunk", payload);
            let id = ChunkId(r.array::<32>("the chunk id")?);
            let raw_len = r.u32("the raw length")?;
            let encoding = r.u8("the encoding")?;
            check_chunk(raw_len, encoding, r.remaining())?;
            Ok(Frame::Chunk {
                id,
                raw_len,
                encoding,
                payload: Bytes::new(),
            })
        }
        TYPE_END => {
            let mut r = Reader::new("End", payload);
            let total_len = r.u64("the total length")?;
            let entries = r.u64("the entry count")?;
            let manifest_digest = ChunkId(r.array::<32>("the manifest digest")?);
            r.finish()?;
            Ok(Frame::End {
                total_len,
                entries,
                manifest_digest,
            })
        }
        TYPE_DONE => {
            let mut r = Reader::new("Done", payload);
            let bytes_written = r.u64("the bytes written")?;
            let chunks_received = r.u64("the chunks received")?;
            r.finish()?;
            Ok(Frame::Done {
                bytes_written,
                chunks_received,
            })
        }
        TYPE_ABORT => {
            let mut r = Reader::new("Abort", payload);
            let code = AbortCode::from_u16(r.u16("the code")?);
            let text = r.rest();
            if text.len() > MAX_ABORT_MESSAGE {
                return Err(malformed(
                    "Abort",
                    format!(
                        "the message is {} bytes, more than the {MAX_ABORT_MESSAGE} allowed",
                        text.len()
                    ),
                ));
            }
            let message = std::str::from_utf8(text)
                .map_err(|e| FrameError::BadUtf8 {
                    valid_up_to: e.valid_up_to(),
                })?
                .to_owned();
            Ok(Frame::Abort { code, message })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

fn parse_manifest(payload: &[u8]) -> Result<Frame, FrameError> {
    let mut r = Reader::new("Manifest", payload);
    let first_index = r.u64("the first index")?;
    let count = r.u32("the count")? as usize;
    check_batch("Manifest", first_index, count)?;
    let expected = BATCH_HEAD_LEN + MANIFEST_ENTRY_LEN * count;
    if payload.len() != expected {
        return Err(malformed(
            "Manifest",
            format!(
                "{count} entries take a {expected}-byte payload, but the payload is {} bytes",
                payload.len()
            ),
        ));
    }
    // count is at most MAX_BATCH_ENTRIES, so this allocation is bounded.
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let id = ChunkId(r.array::<32>("an entry id")?);
        let len = r.u32("an entry length")?;
        let flags = r.u8("an entry's flags")?;
        check_entry_len(i, len)?;
        if flags & !FLAG_ZERO != 0 {
            return Err(malformed(
                "Manifest",
                format!("entry {i} has reserved flag bits set ({flags:#04x})"),
            ));
        }
        entries.push(ManifestEntry {
            id,
            len,
            zero: flags & FLAG_ZERO != 0,
        });
    }
    r.finish()?;
    Ok(Frame::Manifest {
        first_index,
        entries,
    })
}

fn parse_need(payload: &[u8]) -> Result<Frame, FrameError> {
    let mut r = Reader::new("Need", payload);
    let first_index = r.u64("the first index")?;
    let count = r.u32("the count")?;
    check_batch("Need", first_index, count as usize)?;
    let bitmap = r.rest();
    let expected = bitmap_len(count as usize);
    if bitmap.len() != expected {
        return Err(malformed(
            "Need",
            format!(
                "{count} entries take a {expected}-byte bitmap, but {} bytes follow the count",
                bitmap.len()
            ),
        ));
    }
    let mut needed = Vec::new();
    for (byte_index, &byte) in bitmap.iter().enumerate() {
        for bit in 0..8u32 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            // byte_index < 128, so this cannot overflow.
            let offset = byte_index as u32 * 8 + bit;
            if offset >= count {
                return Err(malformed(
                    "Need",
                    format!("bitmap bit {offset} is set, past the {count} entries of the batch"),
                ));
            }
            needed.push(offset);
        }
    }
    Ok(Frame::Need {
        first_index,
        count,
        needed,
    })
}

/// Rules shared by `Manifest` and `Need` heads.
fn check_batch(frame: &'static str, first_index: u64, count: usize) -> Result<(), FrameError> {
    if count == 0 || count > MAX_BATCH_ENTRIES {
        return Err(malformed(
            frame,
            format!("the count is {count}, outside 1..={MAX_BATCH_ENTRIES}"),
        ));
    }
    if first_index.checked_add(count as u64).is_none() {
        return Err(malformed(
            frame,
            format!("first index {first_index} plus count {count} overflows a u64"),
        ));
    }
    Ok(())
}

fn check_entry_len(i: usize, len: u32) -> Result<(), FrameError> {
    if len == 0 || len > MAX_CHUNK_LEN {
        return Err(malformed(
            "Manifest",
            format!("entry {i} has length {len}, outside 1..={MAX_CHUNK_LEN}"),
        ));
    }
    Ok(())
}

fn check_chunk(raw_len: u32, encoding: u8, payload_len: usize) -> Result<(), FrameError> {
    if raw_len == 0 || raw_len > MAX_CHUNK_LEN {
        return Err(malformed(
            "Chunk",
            format!("the raw length is {raw_len}, outside 1..={MAX_CHUNK_LEN}"),
        ));
    }
    if encoding != ENCODING_RAW && encoding != ENCODING_ZSTD {
        return Err(malformed(
            "Chunk",
            format!("unknown encoding {encoding} (0 is raw, 1 is zstd)"),
        ));
    }
    if payload_len == 0 {
        return Err(malformed("Chunk", "the chunk payload is empty"));
    }
    if payload_len > MAX_FRAME_PAYLOAD - CHUNK_HEAD_LEN {
        return Err(malformed(
            "Chunk",
            format!(
                "the chunk payload is {payload_len} bytes, more than the {} a frame holds",
                MAX_FRAME_PAYLOAD - CHUNK_HEAD_LEN
            ),
        ));
    }
    if encoding == ENCODING_RAW && payload_len != raw_len as usize {
        return Err(malformed(
            "Chunk",
            format!("a raw chunk of {raw_len} bytes carries {payload_len} bytes"),
        ));
    }
    Ok(())
}

fn bitmap_len(count: usize) -> usize {
    count.div_ceil(8)
}

/// `message` cut to at most [`MAX_ABORT_MESSAGE`] bytes, at a character boundary.
fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_ABORT_MESSAGE {
        return message;
    }
    let mut end = MAX_ABORT_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// A bounds-checked cursor over one frame's payload.
#[derive(Debug)]
struct Reader<'a> {
    frame: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(frame: &'static str, payload: &'a [u8]) -> Self {
        Reader {
            frame,
            rest: payload,
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FrameError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(malformed(
                self.frame,
                format!("the payload ends inside {what}"),
            )),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, FrameError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &str) -> Result<u16, FrameError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FrameError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, FrameError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.frame,
                format!("{} bytes left over after the last field", self.rest.len()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u8) -> ChunkId {
        ChunkId([seed; 32])
    }

    fn encode(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        assert_eq!(out.len(), frame.encoded_len(), "{frame:?}");
        out
    }

    /// A frame with the given type and payload, bypassing the encoder's checks.
    fn raw(frame_type: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u8(frame_type);
        out.put_u32_le(payload.len() as u32);
        out.put_slice(payload);
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let before = buf.clone();
        let result = decode(&mut buf);
        match &result {
            Ok(Some(_)) => assert!(buf.is_empty(), "left {} bytes", buf.len()),
            _ => assert_eq!(buf, before, "a failed decode consumed bytes"),
        }
        result
    }

    fn malformed_msg(result: Result<Option<Frame>, FrameError>, frame: &str, needle: &str) {
        match result {
            Err(FrameError::Malformed { frame: f, what }) => {
                assert_eq!(f, frame);
                assert!(what.contains(needle), "{what:?} lacks {needle:?}");
            }
            other => panic!("expected a malformed {frame}, got {other:?}"),
        }
    }

    fn samples() -> Vec<Frame> {
        let big_raw: Vec<u8> = (0..MAX_CHUNK_LEN).map(|i| (i % 251) as u8).collect();
        vec![
            Frame::Hello {
                version: VERSION,
                stream_len: 123_456_789_012,
            },
            Frame::Hello {
                version: 9,
                stream_len: u64::MAX,
            },
            Frame::Welcome { version: VERSION },
            Frame::Manifest {
                first_index: 42,
                entries: vec![
                    ManifestEntry {
                        id: id(1),
                        len: 1,
                        zero: false,
                    },
                    ManifestEntry {
                        id: id(2),
                        len: MAX_CHUNK_LEN,
                        zero: true,
                    },
                    ManifestEntry {
                        id: id(3),
                        len: 65_536,
                        zero: false,
                    },
                ],
            },
            Frame::Manifest {
                first_index: u64::MAX - MAX_BATCH_ENTRIES as u64,
                entries: (0..MAX_BATCH_ENTRIES)
                    .map(|i| ManifestEntry {
                        id: id(i as u8),
                        len: MAX_CHUNK_LEN - i as u32,
                        zero: i % 3 == 0,
                    })
                    .collect(),
            },
            Frame::Need {
                first_index: 1000,
                count: 13,
                needed: vec![0, 3, 8, 12],
            },
            Frame::Need {
                first_index: 0,
                count: 8,
                needed: vec![],
            },
            Frame::Need {
                first_index: 7,
                count: MAX_BATCH_ENTRIES as u32,
                needed: (0..MAX_BATCH_ENTRIES as u32).collect(),
            },
            Frame::Chunk {
                id: id(9),
                raw_len: 5,
                encoding: ENCODING_RAW,
                payload: Bytes::from_static(b"hello"),
            },
            Frame::Chunk {
                id: id(10),
                raw_len: MAX_CHUNK_LEN,
                encoding: ENCODING_ZSTD,
                payload: Bytes::from_static(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0]),
            },
            Frame::Chunk {
                id: id(11),
                raw_len: MAX_CHUNK_LEN,
                encoding: ENCODING_RAW,
                payload: Bytes::from(big_raw),
            },
            Frame::End {
                total_len: 1 << 40,
                entries: 17,
                manifest_digest: id(0xee),
            },
            Frame::Done {
                bytes_written: 1 << 40,
                chunks_received: 3,
            },
            Frame::Abort {
                code: AbortCode::HashMismatch,
                message: "chunk 3f2a… did not hash to its id — ünïcödé".to_owned(),
            },
            Frame::Abort {
                code: AbortCode::Other(999),
                message: String::new(),
            },
            Frame::Abort {
                code: AbortCode::Cancelled,
                message: "x".repeat(MAX_ABORT_MESSAGE),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in samples() {
            frame.validate().unwrap();
            let bytes = encode(&frame);
            assert_eq!(bytes[0], frame.frame_type());
            assert_eq!(
                u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize,
                bytes.len() - HEADER_LEN
            );
            assert_eq!(bytes_needed(&bytes), Ok(0));
            let decoded = decode_all(&bytes).unwrap().unwrap();
            assert_eq!(decoded, frame, "{}", frame.name());
            assert_eq!(decoded.name(), frame.name());
        }
    }

    #[test]
    fn the_parts_of_every_frame_join_to_its_bytes() {
        for frame in samples() {
            let [head, payload] = frame.encode_parts();
            let mut joined = head.to_vec();
            joined.extend_from_slice(&payload);
            assert_eq!(joined, encode(&frame).to_vec(), "{}", frame.name());
            match &frame {
                Frame::Chunk { payload: p, .. } => assert_eq!(payload, p),
                _ => assert!(payload.is_empty(), "{}", frame.name()),
            }
        }
    }

    #[test]
    fn wire_layout_is_as_documented() {
        let hello = encode(&Frame::Hello {
            version: 1,
            stream_len: 0x0102,
        });
        assert_eq!(
            &hello[..],
            &[1, 14, 0, 0, 0, b'M', b'G', b'R', b'T', 1, 0, 2, 1, 0, 0, 0, 0, 0, 0]
        );
        let need = encode(&Frame::Need {
            first_index: 5,
            count: 10,
            needed: vec![0, 2, 9],
        });
        assert_eq!(
            &need[..],
            &[4, 14, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0b101, 0b10]
        );
        let abort = encode(&Frame::Abort {
            code: AbortCode::NoSpace,
            message: "full".into(),
        });
        assert_eq!(&abort[..], &[8, 6, 0, 0, 0, 5, 0, b'f', b'u', b'l', b'l']);
        let end = encode(&Frame::End {
            total_len: 0x0102,
            entries: 3,
            manifest_digest: id(0xab),
        });
        let mut expected = vec![
            6, 48, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
        ];
        expected.extend_from_slice(&[0xab; 32]);
        assert_eq!(&end[..], &expected[..]);
    }

    #[test]
    fn version_2_names_the_manifest_digest() {
        // Version 1 put the whole-stream hash where the manifest digest is: same layout, other
        // meaning, so the version had to change.
        assert_eq!(VERSION, 2);
        assert!(FrameError::UnknownType(0x42)
            .to_string()
            .contains("protocol version 2"));
    }

    #[test]
    fn frames_back_to_back_consume_exactly_their_bytes() {
        let frames = samples();
        let mut buf = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut buf);
        }
        buf.put_slice(&[TYPE_DONE, 16, 0]); // the start of one more frame
        for frame in &frames {
            let before = buf.len();
            let decoded = decode(&mut buf).unwrap().unwrap();
            assert_eq!(&decoded, frame);
            assert_eq!(before - buf.len(), frame.encoded_len());
        }
        assert_eq!(decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[TYPE_DONE, 16, 0]);
        assert_eq!(bytes_needed(&buf), Ok(2));
    }

    #[test]
    fn frames_split_at_every_byte_boundary() {
        for frame in samples() {
            if frame.encoded_len() > 4096 {
                continue; // covered by the byte-by-byte stream below
            }
            let bytes = encode(&frame);
            for split in 0..bytes.len() {
                let mut buf = BytesMut::from(&bytes[..split]);
                assert_eq!(
                    decode(&mut buf),
                    Ok(None),
                    "{} split at {split}",
                    frame.name()
                );
                assert_eq!(buf.len(), split);
                assert!(bytes_needed(&buf).unwrap() > 0);
                buf.put_slice(&bytes[split..]);
                assert_eq!(decode(&mut buf), Ok(Some(frame.clone())));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn stream_fed_one_byte_at_a_time() {
        let frames = samples();
        let mut stream = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut stream);
        }
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for &byte in stream.iter() {
            buf.put_u8(byte);
            let needed = bytes_needed(&buf).unwrap();
            match decode(&mut buf).unwrap() {
                Some(frame) => {
                    assert_eq!(needed, 0);
                    decoded.push(frame);
                }
                None => {
                    assert!(needed > 0 && needed <= HEADER_LEN + MAX_FRAME_PAYLOAD);
                }
            }
        }
        assert!(buf.is_empty());
        assert_eq!(decoded, frames);
    }

    #[test]
    fn bytes_needed_counts_header_then_payload() {
        assert_eq!(bytes_needed(&[]), Ok(HEADER_LEN));
        assert_eq!(bytes_needed(&[TYPE_END, 48]), Ok(3));
        assert_eq!(bytes_needed(&[TYPE_END, 48, 0, 0, 0]), Ok(48));
        assert_eq!(bytes_needed(&[TYPE_END, 48, 0, 0, 0, 1, 2]), Ok(46));
        let mut head = vec![TYPE_CHUNK];
        head.extend_from_slice(&(MAX_FRAME_PAYLOAD as u32).to_le_bytes());
        assert_eq!(bytes_needed(&head), Ok(MAX_FRAME_PAYLOAD));
    }

    #[test]
    fn decoded_chunk_payload_is_a_split_of_the_buffer() {
        let frame = Frame::Chunk {
            id: id(1),
            raw_len: 4,
            encoding: ENCODING_RAW,
            payload: Bytes::from_static(b"abcd"),
        };
        let mut buf = encode(&frame);
        let start = buf.as_ptr() as usize;
        let Some(Frame::Chunk { payload, .. }) = decode(&mut buf).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(&payload[..], b"abcd");
        assert_eq!(
            payload.as_ptr() as usize,
            start + HEADER_LEN + CHUNK_HEAD_LEN
        );
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        for len in [MAX_FRAME_PAYLOAD as u32 + 1, 9_999_999, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(TYPE_CHUNK);
            buf.put_u32_le(len);
            let expected = FrameError::TooLarge {
                frame_type: TYPE_CHUNK,
                len,
                max: MAX_FRAME_PAYLOAD,
            };
            assert_eq!(bytes_needed(&buf), Err(expected.clone()));
            assert_eq!(decode(&mut buf), Err(expected));
            assert_eq!(buf.len(), HEADER_LEN);
        }
        let message = FrameError::TooLarge {
            frame_type: 5,
            len: 9_999_999,
            max: MAX_FRAME_PAYLOAD,
        }
        .to_string();
        assert!(
            message.starts_with("frame of type 0x05 declares 9999999 bytes, more than the 524288"),
            "{message}"
        );
    }

    #[test]
    fn impossible_lengths_for_a_type_are_rejected_from_the_header_alone() {
        let cases = [
            (TYPE_HELLO, 15),
            (TYPE_HELLO, 13),
            (TYPE_WELCOME, 0),
            (TYPE_MANIFEST, 12),
            (TYPE_MANIFEST, 12 + 37 * 1025),
            (TYPE_NEED, 12),
            (TYPE_NEED, 12 + 129),
            (TYPE_CHUNK, 37),
            (TYPE_END, 47),
            (TYPE_DONE, 17),
            (TYPE_ABORT, 1),
            (TYPE_ABORT, 1027),
        ];
        for (frame_type, len) in cases {
            let mut buf = BytesMut::new();
            buf.put_u8(frame_type);
            buf.put_u32_le(len);
            let err = decode(&mut buf).unwrap_err();
            assert!(
                matches!(err, FrameError::BadLength { len: l, .. } if l == len),
                "{frame_type}/{len}: {err:?}"
            );
            assert_eq!(bytes_needed(&buf), Err(err));
        }
        let message = decode_all(&[TYPE_DONE, 3, 0, 0, 0])
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "Done frame declares a 3-byte payload, but its payload is always 16 bytes"
        );
    }

    #[test]
    fn unknown_types_are_rejected() {
        for frame_type in [0x00, 0x09, 0x42, 0xff] {
            assert_eq!(
                decode_all(&[frame_type, 0, 0, 0, 0]),
                Err(FrameError::UnknownType(frame_type))
            );
        }
        assert_eq!(decode_all(&[0x09]), Ok(None));
        assert!(FrameError::UnknownType(9).to_string().contains("0x09"));
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut bytes = encode(&Frame::Hello {
            version: 1,
            stream_len: 5,
        });
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(b"HTTP");
        let err = decode_all(&bytes).unwrap_err();
        assert_eq!(err, FrameError::BadMagic { found: *b"HTTP" });
        assert!(err.to_string().contains("b\"HTTP\""), "{err}");
    }

    #[test]
    fn hello_version_is_left_to_the_protocol() {
        let frame = Frame::Hello {
            version: 0xbeef,
            stream_len: 0,
        };
        assert_eq!(decode_all(&encode(&frame)), Ok(Some(frame)));
    }

    fn manifest_payload(first_index: u64, count: u32, entries: &[(u32, u8)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&first_index.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        for &(len, flags) in entries {
            p.extend_from_slice(&[7; 32]);
            p.extend_from_slice(&len.to_le_bytes());
            p.push(flags);
        }
        p
    }

    #[test]
    fn malformed_manifests_are_rejected() {
        let ok = manifest_payload(0, 2, &[(10, 0), (20, 1)]);
        assert!(decode_all(&raw(TYPE_MANIFEST, &ok)).unwrap().is_some());

        let fewer = manifest_payload(0, 3, &[(10, 0), (20, 1)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &fewer)),
            "Manifest",
            "3 entries",
        );
        let more = manifest_payload(0, 1, &[(10, 0), (20, 1)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &more)),
            "Manifest",
            "1 entries",
        );
        let mut trailing = ok.clone();
        trailing.push(0);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &trailing)),
            "Manifest",
            "payload is",
        );
        let zero_count = manifest_payload(0, 0, &[(10, 0)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &zero_count)),
            "Manifest",
            "count is 0",
        );
        let huge_count = manifest_payload(0, 1025, &[(10, 0)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &huge_count)),
            "Manifest",
            "1025",
        );
        let overflow = manifest_payload(u64::MAX, 1, &[(10, 0)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &overflow)),
            "Manifest",
            "overflows",
        );

        let zero_len = manifest_payload(0, 2, &[(10, 0), (0, 0)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &zero_len)),
            "Manifest",
            "entry 1 has length 0",
        );
        let too_long = manifest_payload(0, 1, &[(MAX_CHUNK_LEN + 1, 0)]);
        malformed_msg(
            decode_all(&raw(TYPE_MANIFEST, &too_long)),
            "Manifest",
            "length 262145",
        );
        for flags in [0x02, 0x80, 0xff] {
            let reserved = manifest_payload(0, 1, &[(10, flags)]);
            malformed_msg(
                decode_all(&raw(TYPE_MANIFEST, &reserved)),
                "Manifest",
                "reserved flag",
            );
        }
    }

    fn need_payload(count: u32, bitmap: &[u8]) -> Vec<u8> {
        let mut p = 99u64.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(bitmap);
        p
    }

    #[test]
    fn malformed_needs_are_rejected() {
        let ok = need_payload(13, &[0xff, 0x1f]);
        assert_eq!(
            decode_all(&raw(TYPE_NEED, &ok)),
            Ok(Some(Frame::Need {
                first_index: 99,
                count: 13,
                needed: (0..13).collect(),
            }))
        );
        for stray in [0x20, 0x40, 0x80] {
            let bad = need_payload(13, &[0, 0x1f | stray]);
            malformed_msg(
                decode_all(&raw(TYPE_NEED, &bad)),
                "Need",
                "past the 13 entries",
            );
        }
        let short = need_payload(13, &[0xff]);
        malformed_msg(decode_all(&raw(TYPE_NEED, &short)), "Need", "2-byte bitmap");
        let long = need_payload(13, &[0xff, 0, 0]);
        malformed_msg(decode_all(&raw(TYPE_NEED, &long)), "Need", "2-byte bitmap");
        let zero = need_payload(0, &[0]);
        malformed_msg(decode_all(&raw(TYPE_NEED, &zero)), "Need", "count is 0");
        let huge = need_payload(1025, &[0; 128]);
        malformed_msg(decode_all(&raw(TYPE_NEED, &huge)), "Need", "1025");
    }

    fn chunk_payload(raw_len: u32, encoding: u8, data: &[u8]) -> Vec<u8> {
        let mut p = vec![3; 32];
        p.extend_from_slice(&raw_len.to_le_bytes());
        p.push(encoding);
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn malformed_chunks_are_rejected() {
        for encoding in [2, 3, 0xff] {
            let bad = chunk_payload(3, encoding, b"abc");
            malformed_msg(
                decode_all(&raw(TYPE_CHUNK, &bad)),
                "Chunk",
                "unknown encoding",
            );
        }
        // An empty chunk payload is already ruled out by the header's length.
        let empty = chunk_payload(3, ENCODING_ZSTD, b"");
        assert!(matches!(
            decode_all(&raw(TYPE_CHUNK, &empty)),
            Err(FrameError::BadLength {
                frame: "Chunk",
                len: 37,
                ..
            })
        ));
        malformed_msg(
            decode_all(&raw(TYPE_CHUNK, &chunk_payload(4, ENCODING_RAW, b"abc"))),
            "Chunk",
            "raw chunk of 4 bytes carries 3",
        );
        malformed_msg(
            decode_all(&raw(TYPE_CHUNK, &chunk_payload(2, ENCODING_RAW, b"abc"))),
            "Chunk",
            "raw chunk of 2 bytes carries 3",
        );
        malformed_msg(
            decode_all(&raw(TYPE_CHUNK, &chunk_payload(0, ENCODING_ZSTD, b"abc"))),
            "Chunk",
            "raw length is 0",
        );
        malformed_msg(
            decode_all(&raw(
                TYPE_CHUNK,
                &chunk_payload(MAX_CHUNK_LEN + 1, ENCODING_ZSTD, b"abc"),
            )),
            "Chunk",
            "raw length is 262145",
        );
        // zstd may be larger than the raw bytes (incompressible input).
        let bigger = chunk_payload(1, ENCODING_ZSTD, &[1; 20]);
        assert!(decode_all(&raw(TYPE_CHUNK, &bigger)).unwrap().is_some());
    }

    #[test]
    fn malformed_aborts_are_rejected() {
        let mut bad_utf8 = 1u16.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(b"ok\xff\xfe");
        assert_eq!(
            decode_all(&raw(TYPE_ABORT, &bad_utf8)),
            Err(FrameError::BadUtf8 { valid_up_to: 2 })
        );
        let mut cut_char = 1u16.to_le_bytes().to_vec();
        cut_char.extend_from_slice(&"é".as_bytes()[..1]);
        assert_eq!(
            decode_all(&raw(TYPE_ABORT, &cut_char)),
            Err(FrameError::BadUtf8 { valid_up_to: 0 })
        );
        let mut too_long = 1u16.to_le_bytes().to_vec();
        too_long.extend_from_slice(&[b'a'; MAX_ABORT_MESSAGE + 1]);
        assert!(matches!(
            decode_all(&raw(TYPE_ABORT, &too_long)),
            Err(FrameError::BadLength { frame: "Abort", .. })
        ));
        // The payload parser enforces the limit too, should it be reached another way.
        malformed_msg(
            parse_payload(TYPE_ABORT, &too_long).map(Some),
            "Abort",
            "1025 bytes",
        );
    }

    #[test]
    fn fixed_size_frames_with_missing_or_extra_bytes_are_rejected_by_the_parser() {
        // The header check already refuses these lengths; the parser must refuse them too.
        for frame_type in [TYPE_HELLO, TYPE_WELCOME, TYPE_END, TYPE_DONE] {
            let (name, len, _) = payload_bounds(frame_type).unwrap();
            let mut long = vec![0; len + 1];
            if frame_type == TYPE_HELLO {
                long[..4].copy_from_slice(&MAGIC);
            }
            malformed_msg(
                parse_payload(frame_type, &long).map(Some),
                name,
                "left over",
            );
            malformed_msg(
                parse_payload(frame_type, &long[..len - 1]).map(Some),
                name,
                "ends inside",
            );
        }
    }

    #[test]
    fn long_abort_messages_are_truncated_at_a_char_boundary() {
        let message = "é".repeat(MAX_ABORT_MESSAGE); // 2 bytes each
        let frame = Frame::Abort {
            code: AbortCode::Io,
            message: message.clone(),
        };
        let bytes = encode(&frame);
        assert_eq!(bytes.len(), HEADER_LEN + 2 + MAX_ABORT_MESSAGE);
        let Some(Frame::Abort { code, message: got }) = decode_all(&bytes).unwrap() else {
            panic!("not an abort");
        };
        assert_eq!(code, AbortCode::Io);
        assert_eq!(got, message[..MAX_ABORT_MESSAGE]);

        let odd = format!("a{message}");
        assert_eq!(truncate_message(&odd).len(), MAX_ABORT_MESSAGE - 1);
    }

    #[test]
    fn abort_codes_map_both_ways() {
        for code in 0..=20u16 {
            assert_eq!(AbortCode::from_u16(code).as_u16(), code);
        }
        assert_eq!(AbortCode::from(4), AbortCode::HashMismatch);
        assert_eq!(u16::from(AbortCode::Cancelled), 7);
        assert_eq!(AbortCode::from(0), AbortCode::Other(0));
        assert_eq!(AbortCode::Other(77).to_string(), "unknown abort code 77");
    }

    #[test]
    fn validate_rejects_what_the_decoder_would() {
        let bad = [
            Frame::Manifest {
                first_index: 0,
                entries: vec![],
            },
            Frame::Need {
                first_index: 0,
                count: 4,
                needed: vec![1, 1],
            },
            Frame::Need {
                first_index: 0,
                count: 4,
                needed: vec![2, 1],
            },
            Frame::Need {
                first_index: 0,
                count: 4,
                needed: vec![4],
            },
            Frame::Need {
                first_index: u64::MAX,
                count: 1,
                needed: vec![],
            },
            Frame::Chunk {
                id: id(0),
                raw_len: 3,
                encoding: ENCODING_RAW,
                payload: Bytes::from_static(b"ab"),
            },
            Frame::Chunk {
                id: id(0),
                raw_len: 3,
                encoding: 7,
                payload: Bytes::from_static(b"abc"),
            },
        ];
        for frame in bad {
            assert!(frame.validate().is_err(), "{frame:?}");
            let result = std::panic::catch_unwind(|| encode(&frame));
            assert!(result.is_err(), "encoded {frame:?}");
        }
    }

    /// Decodes `bytes` until it stops; every frame must re-encode to exactly its bytes.
    fn decode_and_reencode(bytes: &[u8]) -> usize {
        let mut buf = BytesMut::from(bytes);
        let mut offset = 0;
        let mut frames = 0;
        loop {
            let before = buf.len();
            match decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    assert_eq!(encode(&frame)[..], bytes[offset..offset + used]);
                    offset += used;
                    frames += 1;
                }
                Ok(None) => {
                    let needed = bytes_needed(&buf).unwrap();
                    assert!(needed > 0 && needed <= HEADER_LEN + MAX_FRAME_PAYLOAD);
                    return frames;
                }
                Err(err) => {
                    assert_eq!(buf.len(), before);
                    assert!(!err.to_string().is_empty());
                    return frames;
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_and_decoded_frames_reencode_exactly() {
        let mut rng = fastrand::Rng::with_seed(0x6d67_7274);
        let valid: Vec<BytesMut> = samples()
            .iter()
            .filter(|f| f.encoded_len() < 8192)
            .map(encode)
            .collect();
        let mut decoded = 0;
        for _ in 0..50_000 {
            let bytes: Vec<u8> = match rng.u8(0..4) {
                // Pure noise.
                0 => (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
                // A plausible header over a noise payload.
                1 => {
                    let frame_type = rng.u8(0..=9);
                    let (_, min, max) = payload_bounds(frame_type).unwrap_or(("", 0, 64));
                    let len = rng.usize(min..=max.min(min + 300));
                    let mut b = vec![frame_type];
                    b.extend_from_slice(&(len as u32).to_le_bytes());
                    b.extend((0..len).map(|_| if rng.bool() { 0 } else { rng.u8(..) }));
                    b
                }
                // Valid frames with a few bytes changed, possibly cut short.
                _ => {
                    let mut b = Vec::new();
                    for _ in 0..rng.usize(1..4) {
                        b.extend_from_slice(&valid[rng.usize(..valid.len())]);
                    }
                    for _ in 0..rng.usize(0..3) {
                        let i = rng.usize(..b.len());
                        b[i] = rng.u8(..);
                    }
                    if rng.u8(0..4) == 0 {
                        b.truncate(rng.usize(..=b.len()));
                    }
                    b
                }
            };
            decoded += decode_and_reencode(&bytes);
        }
        assert!(decoded > 10_000, "only {decoded} frames decoded");
    }
}
