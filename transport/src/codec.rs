//! Per-chunk compression on the sender and decoding plus verification on the receiver.
//!
//! A chunk travels either raw or as one zstd frame. [`encode`] keeps it raw when compression
//! saves less than 1/32 of its length (the compressed form would be over ~96.9% of the raw
//! one): random or already-compressed data then costs no decompression on the receiver, and an
//! encoded payload is never longer than its raw chunk, which bounds every buffer by
//! [`MAX_CHUNK_LEN`]. [`decode_verified`] is the only way received bytes become a chunk: it
//! refuses declared lengths over [`MAX_CHUNK_LEN`], decompresses into a buffer of exactly the
//! declared length (so a decompression bomb fails without allocating more), and checks the
//! blake3 of the result against the chunk's id. zstd contexts are kept per thread, since
//! compression runs on several threads at once and creating a context costs more than
//! compressing a small chunk.

use std::cell::RefCell;

use thiserror::Error;
use zstd::zstd_safe::{self, zstd_sys};

use crate::{ChunkId, MAX_CHUNK_LEN};

/// How a chunk's payload is encoded on the wire and in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// The payload is the raw bytes.
    Raw = 0,
    /// The payload is one or more zstd frames that decompress to the raw bytes.
    Zstd = 1,
}

impl TryFrom<u8> for Encoding {
    type Error = CodecError;

    fn try_from(byte: u8) -> Result<Self, CodecError> {
        match byte {
            0 => Ok(Encoding::Raw),
            1 => Ok(Encoding::Zstd),
            other => Err(CodecError::UnknownEncoding(other)),
        }
    }
}

impl From<Encoding> for u8 {
    fn from(encoding: Encoding) -> u8 {
        encoding as u8
    }
}

/// A chunk as sent over the wire: its encoding and the encoded bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded {
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// The encoded bytes; never longer than the raw chunk.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("encoding", &self.encoding)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Why a received chunk was refused.
#[derive(Debug, Error)]
pub enum CodecError {
    /// The declared raw length is over the protocol limit.
    #[error(
        "chunk declares {raw_len} raw bytes, over the {max}-byte limit: the peer is broken or \
         runs an incompatible chunk size"
    )]
    TooLarge {
        /// Declared raw length.
        raw_len: u32,
        /// [`MAX_CHUNK_LEN`].
        max: u32,
    },
    /// The decoded chunk does not have the declared raw length (for a raw chunk: the payload
    /// length differs; for zstd: the frame decompressed to fewer bytes).
    #[error(
        "chunk declares {declared} raw bytes but decodes to {actual}: the payload was truncated \
         or the peer sent a wrong length"
    )]
    RawLengthMismatch {
        /// Declared raw length.
        declared: u32,
        /// Length actually obtained.
        actual: usize,
    },
    /// A compressed payload longer than the raw chunk it stands for; [`encode`] never makes one.
    #[error(
        "compressed payload of {payload_len} bytes for a {raw_len}-byte chunk: a conforming \
         encoder sends such a chunk raw, check the peer's version"
    )]
    PayloadTooLarge {
        /// Length of the payload received.
        payload_len: usize,
        /// Declared raw length.
        raw_len: u32,
    },
    /// zstd refused the payload.
    #[error("zstd payload is corrupt: {0}; the chunk must be sent again")]
    Corrupt(String),
    /// The zstd payload decompresses to more than the declared raw length; decompression was
    /// stopped at that length.
    #[error(
        "zstd payload inflates beyond its declared {raw_len} raw bytes (possible decompression \
         bomb); refused"
    )]
    Bomb {
        /// Declared raw length, the most that was decompressed.
        raw_len: u32,
    },
    /// The decoded bytes do not hash to the chunk's id.
    #[error(
        "chunk {expected} decodes to bytes hashing to {actual}: corrupted in transit or on disk"
    )]
    HashMismatch {
        /// The id the chunk was announced under.
        expected: ChunkId,
        /// blake3 of the decoded bytes.
        actual: ChunkId,
    },
    /// An encoding byte this version does not know.
    #[error("unknown chunk encoding {0}: the peer or the store was written by a newer version")]
    UnknownEncoding(u8),
}

/// Compression must save at least `raw.len() / KEEP_RAW_DIVISOR` bytes to be used.
const KEEP_RAW_DIVISOR: usize = 32;

/// zstd's code for "destination buffer is too small", as a `size_t` error value.
const DST_SIZE_TOO_SMALL: usize =
    (zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall as usize).wrapping_neg();

thread_local! {
    /// This thread's compressor and the level it is set to.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// This thread's decompression context.
    static DECOMPRESSOR: RefCell<Option<zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Compresses with zstd at `level`; keeps the chunk raw when compression does not pay.
///
/// "Pays" means the zstd frame is at most `raw.len() - raw.len() / 32` bytes (about 96.9% of
/// the raw length). The compressor writes into a buffer of exactly that size, so incompressible
/// data stops early instead of producing a frame that is then thrown away. Any zstd failure also
/// falls back to raw: the result is always a valid encoding of `raw`.
pub fn encode(raw: &[u8], level: i32) -> Encoded {
    compress(raw, level).map_or_else(|| raw_encoded(raw), zstd_encoded)
}

/// [`encode`] of a chunk the caller owns: a chunk kept raw is moved, not copied.
pub fn encode_owned(raw: Vec<u8>, level: i32) -> Encoded {
    match compress(&raw, level) {
        Some(payload) => zstd_encoded(payload),
        None => Encoded {
            encoding: Encoding::Raw,
            payload: raw,
        },
    }
}

/// The zstd frame of `raw` at `level`, when it pays (see [`encode`]).
fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    let budget = raw.len() - raw.len() / KEEP_RAW_DIVISOR;
    if raw.len() < KEEP_RAW_DIVISOR || looks_incompressible(raw) {
        // Too short for a zstd frame (at least 9 bytes) to save 1/32, or noise that zstd would
        // only spend time on.
        return None;
    }
    let compressed = COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some((current, compressor)) => {
                if *current != level {
                    compressor.set_compression_level(level).ok()?;
                    *current = level;
                }
                compressor
            }
            None => {
                let compressor = zstd::bulk::Compressor::new(level).ok()?;
                &mut slot.insert((level, compressor)).1
            }
        };
        let mut out = Vec::with_capacity(budget);
        compressor.compress_to_buffer(raw, &mut out).ok()?;
        Some(out)
    });
    compressed.filter(|payload| payload.len() <= budget)
}

fn zstd_encoded(payload: Vec<u8>) -> Encoded {
    Encoded {
        encoding: Encoding::Zstd,
        payload,
    }
}

/// Bytes sampled by [`looks_incompressible`].
const ENTROPY_SAMPLES: usize = 4096;
/// Above this many bits per byte a sample is treated as noise (random or already compressed or
/// encrypted data). Uniform random bytes measure about 7.95 on 4096 samples; text about 4–5.
const NOISE_BITS_PER_BYTE: f64 = 7.6;

/// Whether `raw` looks like noise, judged from the byte histogram of an evenly spread sample.
/// Costs a few microseconds where zstd level 1 would spend ~100 µs per 64 KiB finding nothing:
/// memory dumps hold plenty of such pages.
fn looks_incompressible(raw: &[u8]) -> bool {
    if raw.len() < 2 * ENTROPY_SAMPLES {
        return false;
    }
    let step = raw.len() / ENTROPY_SAMPLES;
    let mut counts = [0u32; 256];
    for i in 0..ENTROPY_SAMPLES {
        counts[usize::from(raw[i * step])] += 1;
    }
    let n = ENTROPY_SAMPLES as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits > NOISE_BITS_PER_BYTE
}

fn raw_encoded(raw: &[u8]) -> Encoded {
    Encoded {
        encoding: Encoding::Raw,
        payload: raw.to_vec(),
    }
}

/// Decodes a received chunk and checks it against its id.
///
/// Never allocates more than `raw_len` (which must be <= [`MAX_CHUNK_LEN`]) for the output: a
/// zstd payload that would inflate beyond `raw_len` is refused as [`CodecError::Bomb`], and a
/// compressed payload longer than `raw_len` is refused before decompression.
pub fn decode_verified(
    id: &ChunkId,
    raw_len: u32,
    encoding: Encoding,
    payload: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let raw = decode(raw_len, encoding, payload)?;
    let actual = ChunkId::of(&raw);
    if actual != *id {
        return Err(CodecError::HashMismatch {
            expected: *id,
            actual,
        });
    }
    Ok(raw)
}

/// [`decode_verified`] without the hash check: bounds and decompression only.
fn decode(raw_len: u32, encoding: Encoding, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    if raw_len > MAX_CHUNK_LEN {
        return Err(CodecError::TooLarge {
            raw_len,
            max: MAX_CHUNK_LEN,
        });
    }
    match encoding {
        Encoding::Raw => {
            if payload.len() != raw_len as usize {
                return Err(CodecError::RawLengthMismatch {
                    declared: raw_len,
                    actual: payload.len(),
                });
            }
            Ok(payload.to_vec())
        }
        Encoding::Zstd => decompress(raw_len, payload),
    }
}

fn decompress(raw_len: u32, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    if payload.len() > raw_len as usize {
        return Err(CodecError::PayloadTooLarge {
            payload_len: payload.len(),
            raw_len,
        });
    }
    // Cheap early refusal when the frame header states its size; frames that omit it are
    // caught by the bounded output buffer below.
    if let Ok(Some(declared)) = zstd_safe::get_frame_content_size(payload) {
        if declared > u64::from(raw_len) {
            return Err(CodecError::Bomb { raw_len });
        }
    }
    let mut out = Vec::with_capacity(raw_len as usize);
    let result = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match &mut *slot {
            Some(dctx) => dctx,
            None => {
                let dctx = zstd_safe::DCtx::try_create().ok_or_else(|| {
                    CodecError::Corrupt("could not allocate a zstd decompression context".into())
                })?;
                slot.insert(dctx)
            }
        };
        // The output buffer never grows: zstd fails with dstSize_tooSmall instead.
        dctx.decompress(&mut out, payload).map_err(|code| {
            if code == DST_SIZE_TOO_SMALL {
                CodecError::Bomb { raw_len }
            } else {
                CodecError::Corrupt(zstd_safe::get_error_name(code).to_string())
            }
        })
    });
    result?;
    if out.len() != raw_len as usize {
        return Err(CodecError::RawLengthMismatch {
            declared: raw_len,
            actual: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn noise_is_judged_without_compressing_and_text_is_not_noise() {
        let mut rng = fastrand::Rng::with_seed(5);
        let noise: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
        assert!(looks_incompressible(&noise));
        assert_eq!(encode(&noise, 1).encoding, Encoding::Raw);
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(64 * 1024)
            .collect();
        assert!(!looks_incompressible(&text));
        // Half noise, half zeros compresses to about half: it must not be judged noise.
        let mut half = noise.clone();
        half[32 * 1024..].fill(0);
        assert!(!looks_incompressible(&half));
        assert_eq!(encode(&half, 1).encoding, Encoding::Zstd);
    }

    use super::*;
    use std::io::Write;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = vec![0u8; len];
        rng.fill(&mut out);
        out
    }

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "page ",
            "table ",
            "mapping ",
            "anonymous ",
            "vma ",
            "dirty ",
        ];
        let mut rng = fastrand::Rng::with_seed(9);
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
        }
        out.truncate(len);
        out
    }

    fn roundtrip(raw: &[u8]) -> Encoding {
        let encoded = encode(raw, 3);
        let id = ChunkId::of(raw);
        let decoded =
            decode_verified(&id, raw.len() as u32, encoded.encoding, &encoded.payload).unwrap();
        assert_eq!(decoded, raw);
        assert!(encoded.payload.len() <= raw.len());
        encoded.encoding
    }

    #[test]
    fn text_compresses_and_roundtrips() {
        let raw = text(64 * 1024);
        let encoded = encode(&raw, 3);
        assert_eq!(encoded.encoding, Encoding::Zstd);
        assert!(encoded.payload.len() < raw.len() / 2);
        assert_eq!(roundtrip(&raw), Encoding::Zstd);
    }

    #[test]
    fn random_stays_raw() {
        let raw = noise(64 * 1024, 1);
        let encoded = encode(&raw, 3);
        assert_eq!(encoded.encoding, Encoding::Raw);
        assert_eq!(encoded.payload, raw);
        assert_eq!(roundtrip(&raw), Encoding::Raw);
    }

    #[test]
    fn zeros_compress_and_roundtrip() {
        let raw = vec![0u8; MAX_CHUNK_LEN as usize];
        let encoded = encode(&raw, 1);
        assert_eq!(encoded.encoding, Encoding::Zstd);
        assert!(encoded.payload.len() < 1024);
        assert_eq!(roundtrip(&raw), Encoding::Zstd);
    }

    #[test]
    fn tiny_and_empty_chunks_stay_raw() {
        assert_eq!(roundtrip(&[]), Encoding::Raw);
        assert_eq!(roundtrip(b"aaaaaaaaaaaaaaaa"), Encoding::Raw);
    }

    #[test]
    fn level_changes_on_one_thread() {
        let raw = text(100_000);
        let fast = encode(&raw, 1);
        let strong = encode(&raw, 19);
        let fast_again = encode(&raw, 1);
        assert_eq!(fast.payload, fast_again.payload);
        assert!(strong.payload.len() <= fast.payload.len());
        assert_eq!(roundtrip(&raw), Encoding::Zstd);
    }

    #[test]
    fn flipped_byte_is_detected() {
        let raw = text(64 * 1024);
        let id = ChunkId::of(&raw);
        let encoded = encode(&raw, 3);
        for pos in [0, encoded.payload.len() / 2, encoded.payload.len() - 1] {
            let mut bad = encoded.payload.clone();
            bad[pos] ^= 0x40;
            let err = decode_verified(&id, raw.len() as u32, Encoding::Zstd, &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    CodecError::HashMismatch { .. }
                        | CodecError::Corrupt(_)
                        | CodecError::Bomb { .. }
                        | CodecError::RawLengthMismatch { .. }
                ),
                "flip at {pos}: {err:?}"
            );
        }
        let mut bad_raw = raw.clone();
        bad_raw[100] ^= 1;
        let err = decode_verified(&id, raw.len() as u32, Encoding::Raw, &bad_raw).unwrap_err();
        match err {
            CodecError::HashMismatch { expected, actual } => {
                assert_eq!(expected, id);
                assert_eq!(actual, ChunkId::of(&bad_raw));
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
    }

    #[test]
    fn bomb_with_content_size_is_refused() {
        let big = vec![0u8; 10 * 1024 * 1024];
        let payload = zstd::bulk::compress(&big, 3).unwrap();
        assert!(payload.len() < 64 * 1024);
        let err =
            decode_verified(&ChunkId::of(&big), 64 * 1024, Encoding::Zstd, &payload).unwrap_err();
        assert!(
            matches!(err, CodecError::Bomb { raw_len: 65536 }),
            "{err:?}"
        );
    }

    #[test]
    fn bomb_without_content_size_is_refused() {
        // A streamed frame does not state its content size, so only the bounded output buffer
        // stops it.
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let block = vec![0u8; 1024 * 1024];
        for _ in 0..10 {
            encoder.write_all(&block).unwrap();
        }
        let payload = encoder.finish().unwrap();
        assert_eq!(zstd_safe::get_frame_content_size(&payload).unwrap(), None);
        let err = decode(64 * 1024, Encoding::Zstd, &payload).unwrap_err();
        assert!(
            matches!(err, CodecError::Bomb { raw_len: 65536 }),
            "{err:?}"
        );
    }

    #[test]
    fn short_frame_is_a_length_mismatch() {
        let raw = vec![7u8; 1000];
        let payload = zstd::bulk::compress(&raw, 3).unwrap();
        // Decoding with a larger declared length: not a bomb, but the length is wrong.
        let err = decode(2000, Encoding::Zstd, &payload).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::RawLengthMismatch {
                    declared: 2000,
                    actual: 1000
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn output_never_exceeds_declared_length() {
        let raw = text(50_000);
        let encoded = encode(&raw, 3);
        let out = decode(raw.len() as u32, encoded.encoding, &encoded.payload).unwrap();
        assert_eq!(out.capacity(), raw.len());
    }

    #[test]
    fn limits_are_enforced() {
        let err =
            decode_verified(&ChunkId::of(&[]), MAX_CHUNK_LEN + 1, Encoding::Raw, &[]).unwrap_err();
        assert!(
            matches!(err, CodecError::TooLarge { raw_len, max } if raw_len == MAX_CHUNK_LEN + 1 && max == MAX_CHUNK_LEN),
            "{err:?}"
        );
        let err = decode(10, Encoding::Raw, &[0u8; 9]).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::RawLengthMismatch {
                    declared: 10,
                    actual: 9
                }
            ),
            "{err:?}"
        );
        let err = decode(10, Encoding::Zstd, &[0u8; 11]).unwrap_err();
        assert!(matches!(err, CodecError::PayloadTooLarge { .. }), "{err:?}");
        let err = decode(10, Encoding::Zstd, b"not zstd").unwrap_err();
        assert!(matches!(err, CodecError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn encoding_byte_roundtrip() {
        assert_eq!(Encoding::try_from(0).unwrap(), Encoding::Raw);
        assert_eq!(Encoding::try_from(1).unwrap(), Encoding::Zstd);
        assert_eq!(u8::from(Encoding::Zstd), 1);
        assert!(matches!(
            Encoding::try_from(2),
            Err(CodecError::UnknownEncoding(2))
        ));
    }

    #[test]
    fn threads_compress_concurrently() {
        let raw = text(200_000);
        let id = ChunkId::of(&raw);
        std::thread::scope(|s| {
            for level in [1, 3, 5, 7] {
                let raw = &raw;
                s.spawn(move || {
                    for _ in 0..20 {
                        let e = encode(raw, level);
                        let back =
                            decode_verified(&id, raw.len() as u32, e.encoding, &e.payload).unwrap();
                        assert_eq!(&back, raw);
                    }
                });
            }
        });
    }
}
