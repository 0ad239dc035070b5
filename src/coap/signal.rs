//! Signalling messages of CoAP over TCP (RFC 8323 §5): CSM, Ping, Pong,
//! Release and Abort, read from a [`MessageRef`] and written to a buffer.
//!
//! Option numbers of signalling messages depend on the code (RFC 8323 §5.2):
//! option 2 is Max-Message-Size in a CSM but Custody in a Ping. So they are
//! decoded here, never through the request/response table of
//! [`option`](super::option). Every signalling option defined so far is
//! elective; a value of the wrong length is ignored like an unknown elective
//! option (RFC 7252 §5.4.1). What to do about a signal (answer a Ping, Abort
//! on a bad CSM) is the session's decision, not this module's.

use super::code::Code;
use super::message::MessageRef;
use super::option::decode_uint;
use super::writer::MessageWriter;

/// CSM: Max-Message-Size, uint 0–4 bytes (RFC 8323 §5.3.1).
pub const MAX_MESSAGE_SIZE: u16 = 2;
/// CSM: Block-Wise-Transfer, empty (RFC 8323 §5.3.2).
pub const BLOCK_WISE_TRANSFER: u16 = 4;
/// Ping/Pong: Custody, empty (RFC 8323 §5.4.1).
pub const CUSTODY: u16 = 2;
/// Release: Alternative-Address, string 1–255 bytes, repeatable (RFC 8323 §5.5.1).
pub const ALTERNATIVE_ADDRESS: u16 = 2;
/// Release: Hold-Off, uint 0–3 bytes, seconds (RFC 8323 §5.5.2).
pub const HOLD_OFF: u16 = 4;
/// Abort: Bad-CSM-Option, uint 0–2 bytes (RFC 8323 §5.6.1).
pub const BAD_CSM_OPTION: u16 = 2;

/// Max-Message-Size assumed until the peer's CSM says otherwise
/// (RFC 8323 §5.3.1; spec §2.3: also when the peer never sends a CSM).
pub const DEFAULT_MAX_MESSAGE_SIZE: u32 = 1152;

/// Whether `number` is defined for signalling code `code` (RFC 8323 §5.2).
pub fn is_known_option(code: Code, number: u16) -> bool {
    matches!(
        (code, number),
        (Code::CSM, MAX_MESSAGE_SIZE | BLOCK_WISE_TRANSFER)
            | (Code::PING | Code::PONG, CUSTODY)
            | (Code::RELEASE, ALTERNATIVE_ADDRESS | HOLD_OFF)
            | (Code::ABORT, BAD_CSM_OPTION)
    )
}

/// A signalling message, borrowing from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal<'a> {
    /// 7.01 Capabilities and Settings Message (RFC 8323 §5.3).
    Csm {
        max_message_size: Option<u32>,
        block_wise: bool,
    },
    /// 7.02 (RFC 8323 §5.4).
    Ping { custody: bool },
    /// 7.03 (RFC 8323 §5.4).
    Pong { custody: bool },
    /// 7.04 (RFC 8323 §5.5). Only the first Alternative-Address is kept.
    Release {
        alternative_address: Option<&'a [u8]>,
        hold_off: Option<u32>,
    },
    /// 7.05 (RFC 8323 §5.6). The payload is a diagnostic, UTF-8 by intent
    /// but not checked.
    Abort {
        bad_csm_option: Option<u16>,
        diagnostic: &'a [u8],
    },
}

/// Why a message is not a signal we can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// Not a 7.xx code; handle it as a request or response.
    #[error("{0} is not a signalling code")]
    NotSignal(Code),
    /// 7.00 or 7.06–7.31: no signal is defined there (RFC 8323 §11.1).
    #[error("unknown signalling code {0}")]
    UnknownCode(Code),
    /// A critical option not defined for this code (RFC 8323 §5.3: for a
    /// CSM the receiver must Abort, naming it in Bad-CSM-Option).
    #[error("unknown critical option {option} in {code}")]
    UnknownCriticalOption { code: Code, option: u16 },
}

impl SignalError {
    /// The option to name in the Abort's Bad-CSM-Option (RFC 8323 §5.6.1),
    /// when the error is about a CSM.
    pub fn bad_csm_option(&self) -> Option<u16> {
        match *self {
            SignalError::UnknownCriticalOption {
                code: Code::CSM,
                option,
            } => Some(option),
            _ => None,
        }
    }
}

impl<'a> Signal<'a> {
    /// Reads a signalling message. Unknown elective options are ignored;
    /// an unknown critical one is an error naming it (RFC 8323 §5.3, §5.2).
    pub fn parse(message: &MessageRef<'a>) -> Result<Signal<'a>, SignalError> {
        let code = message.code;
        if !code.is_signal() {
            return Err(SignalError::NotSignal(code));
        }
        if !matches!(
            code,
            Code::CSM | Code::PING | Code::PONG | Code::RELEASE | Code::ABORT
        ) {
            return Err(SignalError::UnknownCode(code));
        }
        if let Some(unknown) = message
            .options()
            .find(|o| o.is_critical() && !is_known_option(code, o.number))
        {
            return Err(SignalError::UnknownCriticalOption {
                code,
                option: unknown.number,
            });
        }
        // A value outside the option's defined length is ignored like an
        // unrecognized elective option (RFC 7252 §5.4.1).
        let uint = |number: u16, max_len: usize| {
            message
                .option(number)
                .filter(|value| value.len() <= max_len)
                .and_then(decode_uint)
        };
        let empty = |number: u16| message.option_values(number).any(|value| value.is_empty());
        Ok(match code {
            Code::CSM => Signal::Csm {
                max_message_size: uint(MAX_MESSAGE_SIZE, 4),
                block_wise: empty(BLOCK_WISE_TRANSFER),
            },
            Code::PING => Signal::Ping {
                custody: empty(CUSTODY),
            },
            Code::PONG => Signal::Pong {
                custody: empty(CUSTODY),
            },
            Code::RELEASE => Signal::Release {
                alternative_address: message
                    .option_values(ALTERNATIVE_ADDRESS)
                    .find(|value| (1..=255).contains(&value.len())),
                hold_off: uint(HOLD_OFF, 3),
            },
            _ => Signal::Abort {
                bad_csm_option: uint(BAD_CSM_OPTION, 2).and_then(|v| u16::try_from(v).ok()),
                diagnostic: message.payload,
            },
        })
    }

    /// The code this signal is sent with.
    pub fn code(&self) -> Code {
        match self {
            Signal::Csm { .. } => Code::CSM,
            Signal::Ping { .. } => Code::PING,
            Signal::Pong { .. } => Code::PONG,
            Signal::Release { .. } => Code::RELEASE,
            Signal::Abort { .. } => Code::ABORT,
        }
    }

    /// Appends this signal to `out`; returns the frame length.
    pub fn write(&self, out: &mut Vec<u8>, token: &[u8]) -> usize {
        let mut w = MessageWriter::new(out, self.code(), token);
        // Option numbers in ascending order within each arm (2 before 4).
        match *self {
            Signal::Csm {
                max_message_size,
                block_wise,
            } => {
                if let Some(size) = max_message_size {
                    w.option_uint(MAX_MESSAGE_SIZE, size);
                }
                if block_wise {
                    w.option(BLOCK_WISE_TRANSFER, &[]);
                }
            }
            Signal::Ping { custody } | Signal::Pong { custody } => {
                if custody {
                    w.option(CUSTODY, &[]);
                }
            }
            Signal::Release {
                alternative_address,
                hold_off,
            } => {
                if let Some(address) = alternative_address {
                    w.option(ALTERNATIVE_ADDRESS, address);
                }
                if let Some(seconds) = hold_off {
                    w.option_uint(HOLD_OFF, seconds);
                }
            }
            Signal::Abort {
                bad_csm_option,
                diagnostic,
            } => {
                if let Some(number) = bad_csm_option {
                    w.option_uint(BAD_CSM_OPTION, u32::from(number));
                }
                w.payload(diagnostic);
            }
        }
        w.finish()
    }
}

/// Appends a CSM (RFC 8323 §5.3). The gateway's own CSM carries no options
/// (spec §2.3): `write_csm(out, token, None, false)`.
pub fn write_csm(
    out: &mut Vec<u8>,
    token: &[u8],
    max_message_size: Option<u32>,
    block_wise: bool,
) -> usize {
    Signal::Csm {
        max_message_size,
        block_wise,
    }
    .write(out, token)
}

/// Appends a Ping (RFC 8323 §5.4).
pub fn write_ping(out: &mut Vec<u8>, token: &[u8], custody: bool) -> usize {
    Signal::Ping { custody }.write(out, token)
}

/// Appends a Pong (RFC 8323 §5.4). The gateway echoes the Ping's token and
/// does not echo Custody (spec §2.3).
pub fn write_pong(out: &mut Vec<u8>, token: &[u8], custody: bool) -> usize {
    Signal::Pong { custody }.write(out, token)
}

/// Appends a Release without options (RFC 8323 §5.5).
pub fn write_release(out: &mut Vec<u8>, token: &[u8]) -> usize {
    Signal::Release {
        alternative_address: None,
        hold_off: None,
    }
    .write(out, token)
}

/// Appends an Abort (RFC 8323 §5.6) with an optional Bad-CSM-Option and a
/// diagnostic payload (empty string: no payload).
pub fn write_abort(
    out: &mut Vec<u8>,
    token: &[u8],
    bad_csm_option: Option<u16>,
    diagnostic: &str,
) -> usize {
    Signal::Abort {
        bad_csm_option,
        diagnostic: diagnostic.as_bytes(),
    }
    .write(out, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::option::URI_PATH;
    use proptest::prelude::*;

    fn parse(bytes: &[u8]) -> Result<Signal<'_>, SignalError> {
        Signal::parse(&MessageRef::parse(bytes).expect("valid frame"))
    }

    #[test]
    fn empty_csm_without_token_is_00_e1() {
        // RFC 8323 §3.2: Len 0, TKL 0, code 7.01.
        let mut out = Vec::new();
        assert_eq!(write_csm(&mut out, &[], None, false), 2);
        assert_eq!(out, [0x00, 0xe1]);
        assert_eq!(
            parse(&out),
            Ok(Signal::Csm {
                max_message_size: None,
                block_wise: false
            })
        );
    }

    #[test]
    fn csm_with_both_options() {
        // Option 2 (delta 2, length 2) = 1152 = 0x0480; option 4 (delta 2,
        // length 0). Len 4.
        let bytes = [0x40, 0xe1, 0x22, 0x04, 0x80, 0x20];
        let mut out = Vec::new();
        write_csm(&mut out, &[], Some(DEFAULT_MAX_MESSAGE_SIZE), true);
        assert_eq!(out, bytes);
        assert_eq!(
            parse(&bytes),
            Ok(Signal::Csm {
                max_message_size: Some(1152),
                block_wise: true
            })
        );
    }

    #[test]
    fn gateway_csm_with_eight_byte_token() {
        let token = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut out = Vec::new();
        write_csm(&mut out, &token, None, false);
        assert_eq!(out, [0x08, 0xe1, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn ping_and_pong_with_token() {
        let mut out = Vec::new();
        write_ping(&mut out, &[0xde, 0xad, 0xbe, 0xef], false);
        assert_eq!(out, [0x04, 0xe2, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(parse(&out), Ok(Signal::Ping { custody: false }));

        out.clear();
        write_ping(&mut out, &[0xde, 0xad, 0xbe, 0xef], true);
        assert_eq!(out, [0x14, 0xe2, 0xde, 0xad, 0xbe, 0xef, 0x20]);
        assert_eq!(parse(&out), Ok(Signal::Ping { custody: true }));

        out.clear();
        write_pong(&mut out, &[0x2a], false);
        assert_eq!(out, [0x01, 0xe3, 0x2a]);
        let m = MessageRef::parse(&out).unwrap();
        assert_eq!(m.token, &[0x2a]);
        assert_eq!(Signal::parse(&m), Ok(Signal::Pong { custody: false }));
    }

    #[test]
    fn release_and_abort() {
        let mut out = Vec::new();
        write_release(&mut out, &[]);
        assert_eq!(out, [0x00, 0xe4]);

        // Bad-CSM-Option 4: delta 2, length 1, value 4; marker; "bad". Len 6.
        out.clear();
        write_abort(&mut out, &[], Some(4), "bad");
        assert_eq!(out, [0x60, 0xe5, 0x21, 0x04, 0xff, b'b', b'a', b'd']);
        assert_eq!(
            parse(&out),
            Ok(Signal::Abort {
                bad_csm_option: Some(4),
                diagnostic: b"bad"
            })
        );

        // Release: Alternative-Address "h:1" twice (first kept), Hold-Off 30.
        let bytes = [0x80, 0xe4, 0x23, b'h', b':', b'1', 0x01, b'x', 0x21, 30];
        assert_eq!(
            parse(&bytes),
            Ok(Signal::Release {
                alternative_address: Some(b"h:1"),
                hold_off: Some(30)
            })
        );
    }

    #[test]
    fn unknown_critical_csm_option_names_the_option() {
        // CSM with option 3 (odd: critical, undefined for 7.01).
        let bytes = [0x10, 0xe1, 0x30];
        let err = parse(&bytes).unwrap_err();
        assert_eq!(
            err,
            SignalError::UnknownCriticalOption {
                code: Code::CSM,
                option: 3
            }
        );
        assert_eq!(err.bad_csm_option(), Some(3));
        assert_eq!(err.to_string(), "unknown critical option 3 in 7.01");
        assert_eq!(
            MessageRef::parse(&bytes)
                .unwrap()
                .first_unknown_critical_option(),
            Some(3)
        );

        // Uri-Path (11) means nothing in a CSM and is critical.
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::CSM, &[])
            .option_uint(MAX_MESSAGE_SIZE, 2048)
            .option_str(URI_PATH, "x")
            .finish();
        assert_eq!(parse(&out).unwrap_err().bad_csm_option(), Some(11));
    }

    #[test]
    fn unknown_elective_options_and_malformed_values_are_ignored() {
        // CSM: option 6 (elective, unknown), Max-Message-Size of 5 bytes,
        // Block-Wise-Transfer with a value.
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::CSM, &[])
            .option(MAX_MESSAGE_SIZE, &[0, 0, 0, 4, 0])
            .option(BLOCK_WISE_TRANSFER, &[1])
            .option(6, b"?")
            .finish();
        assert_eq!(
            parse(&out),
            Ok(Signal::Csm {
                max_message_size: None,
                block_wise: false
            })
        );
        // A critical option in a Ping is refused, but not as a CSM problem.
        let err = parse(&[0x10, 0xe2, 0x10]).unwrap_err();
        assert_eq!(
            err,
            SignalError::UnknownCriticalOption {
                code: Code::PING,
                option: 1
            }
        );
        assert_eq!(err.bad_csm_option(), None);
    }

    #[test]
    fn codes_that_are_not_signals() {
        assert_eq!(parse(&[0x00, 0x01]), Err(SignalError::NotSignal(Code::GET)));
        assert_eq!(
            parse(&[0x00, 0xe6]),
            Err(SignalError::UnknownCode(Code(0xe6)))
        );
        assert_eq!(
            parse(&[0x00, 0xe0]),
            Err(SignalError::UnknownCode(Code(0xe0)))
        );
    }

    fn signal() -> impl Strategy<Value = Signal<'static>> {
        // Leaked so the signal can borrow 'static bytes; tests only.
        let address = prop::collection::vec(any::<u8>(), 1..=255)
            .prop_map(|v| &*Box::leak(v.into_boxed_slice()));
        let diagnostic = prop::collection::vec(any::<u8>(), 0..=64)
            .prop_map(|v| &*Box::leak(v.into_boxed_slice()));
        prop_oneof![
            (any::<Option<u32>>(), any::<bool>()).prop_map(|(max_message_size, block_wise)| {
                Signal::Csm {
                    max_message_size,
                    block_wise,
                }
            }),
            any::<bool>().prop_map(|custody| Signal::Ping { custody }),
            any::<bool>().prop_map(|custody| Signal::Pong { custody }),
            (
                prop::option::of(address),
                prop::option::of(0u32..=0xff_ffff)
            )
                .prop_map(|(alternative_address, hold_off)| Signal::Release {
                    alternative_address,
                    hold_off
                }),
            (any::<Option<u16>>(), diagnostic).prop_map(|(bad_csm_option, diagnostic)| {
                Signal::Abort {
                    bad_csm_option,
                    diagnostic,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn signals_round_trip(signal in signal(), token in prop::collection::vec(any::<u8>(), 0..=8)) {
            let mut out = Vec::new();
            let n = signal.write(&mut out, &token);
            prop_assert_eq!(n, out.len());
            let m = MessageRef::parse(&out).unwrap();
            prop_assert_eq!(m.token, &token[..]);
            prop_assert_eq!(m.first_unknown_critical_option(), None);
            prop_assert_eq!(Signal::parse(&m), Ok(signal));
        }
    }
}
