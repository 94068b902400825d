//! Arbitrary bytes into the frame decoder (as a stream, with a small maximum)
//! and into the message decoder: no panic, and whatever decodes re-encodes
//! within the maximum and decodes to itself. `iim/tests/wire.rs` runs the
//! same properties under proptest on stable.

#![no_main]

use bytes::BytesMut;
use iim::wire::{self, HEADER_LEN, Message};
use libfuzzer_sys::fuzz_target;

/// Small, so that length checks are hit often.
const MAX_FRAME: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = wire::decode(&mut buf, MAX_FRAME) {
        let bytes = wire::encode_to_bytes(&frame, usize::MAX).expect("re-encode");
        assert!(bytes.len() - HEADER_LEN <= MAX_FRAME);
        let mut again = BytesMut::from(&bytes[..]);
        assert_eq!(wire::decode(&mut again, usize::MAX), Ok(Some(frame)));
    }

    if let Ok(message) = Message::decode(data) {
        assert_eq!(Message::decode(&message.encode()), Ok(message));
    }
});
