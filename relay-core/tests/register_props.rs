//! Property tests of the registration codec (`relay_core::register`): any frame encodes within
//! the size limit and decodes to itself; a truncated frame is "need more", never an error;
//! the streaming decoder gives the same frames however the bytes are split; and no byte
//! string makes the decoder panic or buffer more than it was fed.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use relay_core::register::{
    Decoder, DeviceType, ErrorCode, ErrorFrame, FirmwareVersion, Frame, FrameError, HEADER_LEN,
    MAX_FRAME_LEN, Number, Refusal, Refused, Register, Registered, RegistrationId, ScramMessage,
    Text,
};

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    // IPv6 flow info and scope id are not carried on the wire, so they stay zero here.
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn number() -> impl Strategy<Value = Number> {
    "[0-9]{1,32}".prop_map(|s| Number::new(s).unwrap())
}

fn device_type() -> impl Strategy<Value = DeviceType> {
    prop_oneof![
        Just("openstage_hfa".to_owned()),
        Just("deskphone_cp_hfa".to_owned()),
        "[a-z0-9_]{1,32}",
    ]
    .prop_map(|s| DeviceType::new(s).unwrap())
}

fn firmware() -> impl Strategy<Value = FirmwareVersion> {
    "[ -~]{1,64}".prop_map(|s| FirmwareVersion::new(s).unwrap())
}

fn text() -> impl Strategy<Value = Text> {
    // Any characters, made admissible (control characters replaced, cut at 256 bytes).
    ".{0,100}".prop_map(|s| Text::lossy(&s))
}

fn scram() -> impl Strategy<Value = ScramMessage> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 1..200),
        1 => prop::collection::vec(any::<u8>(), ScramMessage::MAX_LEN..=ScramMessage::MAX_LEN),
    ]
    .prop_map(|b| ScramMessage::new(b).unwrap())
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::AuthFailed),
        any::<u32>().prop_map(|retry_after_s| Refusal::LockedOut { retry_after_s }),
        Just(Refusal::WeakPassword),
        Just(Refusal::FirmwareTooOld),
        Just(Refusal::NotAllowedExternal),
        Just(Refusal::BadRequest),
        any::<Option<u32>>().prop_map(|retry_after_s| Refusal::ServerBusy { retry_after_s }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let register = (
        number(),
        any::<[u8; 6]>(),
        device_type(),
        firmware(),
        socket_addr(),
        any::<u32>(),
        scram(),
    )
        .prop_map(
            |(number, mac, device_type, firmware, media_addr, keepalive_s, client_first)| {
                Frame::Register(Register {
                    number,
                    mac,
                    device_type,
                    firmware,
                    media_addr,
                    keepalive_s,
                    client_first,
                })
            },
        );
    let registered = (
        scram(),
        any::<u32>(),
        any::<u32>(),
        socket_addr(),
        any::<u64>(),
    )
        .prop_map(|(server_final, keepalive_s, expires_s, public_addr, id)| {
            Frame::Registered(Registered {
                server_final,
                keepalive_s,
                expires_s,
                public_addr,
                registration_id: RegistrationId(id),
            })
        });
    prop_oneof![
        register,
        scram().prop_map(|server_first| Frame::Challenge { server_first }),
        scram().prop_map(|client_final| Frame::Proof { client_final }),
        registered,
        (refusal(), text()).prop_map(|(refusal, text)| Frame::Refused(Refused { refusal, text })),
        any::<u32>().prop_map(|seq| Frame::Keepalive { seq }),
        any::<u32>().prop_map(|seq| Frame::KeepaliveAck { seq }),
        Just(Frame::Unregister),
        Just(Frame::Unregistered),
        (prop::sample::select(ErrorCode::ALL.to_vec()), text())
            .prop_map(|(code, text)| Frame::Error(ErrorFrame { code, text })),
    ]
}

/// Every frame the decoder gives for `bytes` fed in pieces of the given sizes (cycled), and
/// the error that stopped it, if any.
fn decode_in_pieces(bytes: &[u8], sizes: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        d.feed(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        // Never more than one partial frame stays buffered.
        assert!(d.buffered() < MAX_FRAME_LEN);
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = f.to_bytes();
        prop_assert!(bytes.len() <= MAX_FRAME_LEN);
        prop_assert_eq!(Frame::decode(&bytes), Ok(Some((f.clone(), bytes.len()))));
        // Encoding is canonical: re-encoding the decoded frame gives the same bytes.
        let mut again = Vec::new();
        f.encode(&mut again);
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn a_truncated_frame_needs_more(f in frame(), cut in any::<prop::sample::Index>()) {
        let bytes = f.to_bytes();
        let n = cut.index(bytes.len());
        prop_assert_eq!(Frame::decode(&bytes[..n]), Ok(None));
    }

    #[test]
    fn splitting_the_stream_changes_nothing(
        frames in prop::collection::vec(frame(), 1..6),
        sizes in prop::collection::vec(1usize..64, 1..8),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes);
        }
        let whole = decode_in_pieces(&bytes, &[bytes.len()]);
        prop_assert_eq!(&whole, &(frames.clone(), None));
        prop_assert_eq!(&decode_in_pieces(&bytes, &[1]), &whole);
        prop_assert_eq!(&decode_in_pieces(&bytes, &sizes), &whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        sizes in prop::collection::vec(1usize..256, 1..8),
    ) {
        let whole = decode_in_pieces(&bytes, &[bytes.len().max(1)]);
        prop_assert_eq!(&decode_in_pieces(&bytes, &sizes), &whole);
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn a_valid_header_on_arbitrary_body_never_panics(
        message in 0u8..=12,
        flags in prop_oneof![9 => Just(0u8), 1 => any::<u8>()],
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![0x48, 1, message, flags];
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&body);
        match Frame::decode(&bytes) {
            Ok(Some((f, n))) => {
                prop_assert_eq!(n, bytes.len());
                // A decoded frame re-encodes to a frame that decodes to itself.
                let again = f.to_bytes();
                prop_assert_eq!(Frame::decode(&again), Ok(Some((f, again.len()))));
            }
            Ok(None) => prop_assert!(false, "a complete frame is never incomplete"),
            Err(e) => prop_assert!(!e.is_fatal(), "{e}"),
        }
    }

    #[test]
    fn a_hostile_length_is_refused_from_the_header(len in (MAX_FRAME_LEN - HEADER_LEN + 1)..=65535usize) {
        let mut d = Decoder::new();
        let l = (len as u16).to_be_bytes();
        d.feed(&[0x48, 1, 1, 0, l[0], l[1]]);
        prop_assert_eq!(d.next_frame(), Err(FrameError::TooLarge(len + HEADER_LEN)));
        prop_assert_eq!(d.buffered(), 0);
    }
}
