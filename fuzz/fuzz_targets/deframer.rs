//! Bytes from a peer through everything the gateway does with them before
//! the session decides: frame boundaries, parsing, the option walk, the
//! option accessors and signalling. Any panic is a bug (RFC 8323 input is
//! attacker-controlled from the first byte after the TLS handshake).
#![no_main]

use coap_gateway::coap::{frame_len, next_message, Deframer, MessageRef, MessageWriter, Signal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a receive limit, so both "too large" and
    // "fits" paths are reached with small inputs.
    let (max, bytes) = match data.split_first() {
        Some((&selector, rest)) => (usize::from(selector) * 4, rest),
        None => (0, data),
    };

    let len = frame_len(bytes, max);
    match next_message(bytes, max) {
        Ok(Some((message, used))) => {
            // check, then parse: both must agree on the boundary.
            assert_eq!(len, Ok(Some(used)));
            assert!(used <= bytes.len());
            exercise(message);
        }
        Ok(None) => assert_eq!(len, Ok(None)),
        Err(_) => {}
    }

    // Parsing the input as one exact frame, without the size limit.
    if let Ok(message) = MessageRef::parse(bytes) {
        exercise(message);
    }

    // A stream of frames, as a connection's receive buffer.
    let deframer = Deframer::new(max);
    let mut messages = deframer.messages(bytes);
    for message in messages.by_ref().flatten() {
        exercise(message);
    }
    assert!(messages.consumed() <= bytes.len());
});

fn exercise(message: MessageRef<'_>) {
    let mut count = 0usize;
    let mut previous = 0u16;
    for option in message.options() {
        // Options come out sorted, and every value lies in the options bytes.
        assert!(option.number >= previous);
        previous = option.number;
        count += 1;
        let _ = (option.uint(), option.str(), option.is_critical());
    }
    assert!(count <= message.raw_options().len());
    let _ = message.uri_path().count();
    let _ = message.uri_path_is(&["oic", "sec", "session"]);
    let _ = message.uri_queries().count();
    let _ = (
        message.content_format(),
        message.accept(),
        message.observe(),
    );
    let _ = (message.etag(), message.first_unknown_critical_option());
    reencode(message);
    match Signal::parse(&message) {
        Ok(signal) => assert_eq!(signal.code(), message.code),
        Err(error) => {
            let _ = (error.to_string(), error.bad_csm_option());
        }
    }
}

/// Writing a parsed message again and parsing that gives the same message:
/// the writer and the parser agree on every form the parser accepts.
fn reencode(message: MessageRef<'_>) {
    let mut out = vec![0xa5];
    let mut writer = MessageWriter::new(&mut out, message.code, message.token);
    for option in message.options() {
        writer.option(option.number, option.value);
    }
    let len = writer.payload(message.payload).finish();
    drop(writer);
    let frame = out.get(1..).unwrap_or_default();
    assert_eq!(len, frame.len());
    assert_eq!(frame_len(frame, usize::MAX), Ok(Some(len)));
    let again = MessageRef::parse(frame).expect("re-encoded message parses");
    assert_eq!(again, message);
}
