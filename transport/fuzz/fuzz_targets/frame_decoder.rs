//! Feeds arbitrary bytes to the frame decoder in pieces, the way a socket would deliver them.
//!
//! The decoder must never panic, must never ask for more than one maximal frame, must consume
//! nothing when it fails, and every frame it returns must re-encode to exactly the bytes it
//! consumed.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use transport::frame::{bytes_needed, decode, HEADER_LEN, MAX_FRAME_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the size of the pieces the rest is fed in (0 = all at once).
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let piece = if piece == 0 {
        data.len().max(1)
    } else {
        usize::from(piece)
    };

    let mut buf = BytesMut::new();
    let mut fed = 0; // bytes of `data` put into `buf` so far
    let mut consumed = 0; // bytes of `data` the decoder has consumed
    loop {
        loop {
            let needed = bytes_needed(&buf);
            let before = buf.len();
            match decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert_eq!(needed, Ok(0));
                    let used = before - buf.len();
                    assert_eq!(frame.encoded_len(), used);
                    let mut out = BytesMut::new();
                    frame.encode(&mut out);
                    assert_eq!(&out[..], &data[consumed..consumed + used], "{frame:?}");
                    consumed += used;
                }
                Ok(None) => {
                    let needed = needed.expect("bytes_needed failed where decode did not");
                    assert!(needed > 0 && needed <= HEADER_LEN + MAX_FRAME_PAYLOAD);
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(error) => {
                    // A bad header fails bytes_needed the same way; a bad payload does not.
                    if let Err(header_error) = needed {
                        assert_eq!(header_error, error);
                    }
                    assert_eq!(buf.len(), before, "a failed decode consumed bytes");
                    assert!(!error.to_string().is_empty());
                    return;
                }
            }
        }
        if fed == data.len() {
            return;
        }
        let n = piece.min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
    }
});
