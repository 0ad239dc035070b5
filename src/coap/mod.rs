//! CoAP over TCP and TLS (RFC 8323): framing, messages, options, signalling.
//!
//! What it does: finds frame boundaries in a receive buffer ([`deframer`]),
//! parses one frame into a [`MessageRef`] that borrows every byte from that
//! buffer, walks options, reads and writes the 7.xx signalling messages
//! ([`signal`]), and encodes messages into a caller-owned buffer
//! ([`writer`]). Nothing is allocated per inbound message, and nothing a peer
//! sends can make it panic: bad input is a [`FrameError`].
//!
//! What it does not do: IO, clocks, TLS, token matching, retransmission,
//! block-wise reassembly, Observe state, or deciding how to answer a message
//! (answering a Ping, Aborting on a bad CSM, 4.02 for a bad option). Those
//! belong to `session`. CoAP over UDP (message IDs and types, RFC 7252 §3) is
//! not handled here either.

pub mod code;
pub mod deframer;
pub mod error;
pub mod message;
pub mod option;
pub mod signal;
pub mod writer;

pub use code::Code;
pub use deframer::{frame_len, next_message, Deframer};
pub use error::FrameError;
pub use message::MessageRef;
pub use option::{OptionRef, Options};
pub use signal::{Signal, SignalError};
pub use writer::MessageWriter;

#[cfg(test)]
mod garbage {
    //! Whatever the bytes, the codec answers and never panics.

    use super::*;
    use proptest::prelude::*;

    /// Everything a caller might do with bytes from a peer.
    fn exercise(bytes: &[u8], max: usize) {
        let _ = frame_len(bytes, max);
        let parsed = MessageRef::parse(bytes);
        if let Ok(Some((message, used))) = next_message(bytes, max) {
            assert!(used <= bytes.len());
            touch(message);
        }
        if let Ok(message) = parsed {
            touch(message);
        }
        for message in Deframer::new(max).messages(bytes).flatten() {
            touch(message);
        }
    }

    fn touch(message: MessageRef<'_>) {
        for option in message.options() {
            let _ = (option.uint(), option.str(), option.is_critical());
        }
        let _ = message.uri_path().count();
        let _ = message.uri_path_is(&["oic", "rd"]);
        let _ = message.uri_queries().last();
        let _ = (
            message.content_format(),
            message.accept(),
            message.observe(),
        );
        let _ = (message.etag(), message.first_unknown_critical_option());
        if let Err(e) = Signal::parse(&message) {
            let _ = (e.to_string(), e.bad_csm_option());
        }
    }

    #[test]
    fn every_byte_pair_and_triple_prefix() {
        for a in 0..=u8::MAX {
            for b in 0..=u8::MAX {
                exercise(&[a, b], 64);
                exercise(&[a, b, 0xff, 0x00], 64);
            }
        }
    }

    /// A valid message, cut at every length and with every single byte
    /// replaced by a few interesting values.
    #[test]
    fn truncations_and_mutations_of_a_valid_frame() {
        let mut frame = Vec::new();
        MessageWriter::new(&mut frame, Code::POST, &[1, 2, 3])
            .option_str(option::URI_PATH, "oic")
            .option_str(option::URI_PATH, "rd")
            .option_uint(option::CONTENT_FORMAT, 10000)
            .option(300, &[7; 20])
            .option_uint(option::OCF_CONTENT_FORMAT_VERSION, 0x0800)
            .payload(&[0xbf; 40])
            .finish();
        for cut in 0..frame.len() {
            assert_eq!(frame_len(&frame[..cut], 1024), Ok(None));
            assert!(MessageRef::parse(&frame[..cut]).is_err());
            exercise(&frame[..cut], 1024);
        }
        for at in 0..frame.len() {
            for value in [0x00, 0x0d, 0x0e, 0x0f, 0xd0, 0xe0, 0xf0, 0xff, 0xdd, 0xee] {
                let mut mutated = frame.clone();
                mutated[at] = value;
                exercise(&mutated, 1024);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), max in 0usize..1024) {
            exercise(&bytes, max);
        }

        /// Random bytes behind a plausible header, so the option walk is
        /// reached more often than with fully random input.
        #[test]
        fn random_bodies_never_panic(tkl in 0u8..=8, code in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut frame = Vec::new();
            let token = [0u8; 8];
            MessageWriter::new(&mut frame, Code(code), &token[..usize::from(tkl)])
                .payload(&body)
                .finish();
            // Remove the payload marker so the random body is read as options.
            if let Some(at) = frame.iter().position(|&b| b == 0xff) {
                if !body.is_empty() {
                    frame.remove(at);
                    exercise(&frame, usize::MAX);
                    // The length field still counts the removed marker.
                    frame.push(0x00);
                    exercise(&frame, usize::MAX);
                }
            }
        }
    }
}
