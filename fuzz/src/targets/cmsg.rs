//! The user-space relay's control messages (`relay-user/src/userspace/cmsg.rs`): decoding the
//! received TOS from any buffer and any `msg_controllen` must neither panic nor loop, and must
//! find the TOS of every buffer the encoder writes; `sockaddr_in` conversions round-trip.
//!
//! Input: a buffer of control messages, each with a level and type from a small set and a
//! `cmsg_len` that is either right or arbitrary (any 64-bit value), then a `msg_controllen`.
use std::net::{Ipv4Addr, SocketAddrV4};

use relay_user::userspace::cmsg_codec::{CMSG_CAP, decode_tos, encode_tx, sockaddr_round_trip};

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "cmsg",
    run,
    seeds,
};

/// `struct cmsghdr` on this target: `size_t cmsg_len; int cmsg_level; int cmsg_type`.
const HDR: usize = std::mem::size_of::<libc::cmsghdr>();

fn align(n: usize) -> usize {
    (n + 7) & !7
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    match i.below(3) {
        0 => {
            // Raw bytes and a length, as a misbehaving kernel could hand back.
            let len = match i.below(3) {
                0 => i.u64() as usize,
                _ => i.below(CMSG_CAP + 16),
            };
            let _ = decode_tos(i.rest(), len);
        }
        1 => {
            let mut buf = vec![0u8; CMSG_CAP];
            let mut off = 0;
            while off + HDR <= CMSG_CAP && !i.is_empty() {
                let any = i32::from(i.u8());
                let level = i.pick(&[libc::IPPROTO_IP, libc::SOL_SOCKET, any]);
                let any = i32::from(i.u8());
                let ty = i.pick(&[libc::IP_TOS, libc::IP_PKTINFO, libc::IP_TTL, any]);
                let data_len = i.below(16);
                let clen: u64 = match i.below(5) {
                    0 => i.u64(),
                    1 => u64::from(i.u8()),
                    2 => u64::MAX - u64::from(i.u8()),
                    _ => (HDR + data_len) as u64,
                };
                buf[off..off + 8].copy_from_slice(&clen.to_ne_bytes());
                buf[off + 8..off + 12].copy_from_slice(&level.to_ne_bytes());
                buf[off + 12..off + 16].copy_from_slice(&ty.to_ne_bytes());
                for b in buf.iter_mut().skip(off + HDR).take(data_len) {
                    *b = i.u8();
                }
                off += align(HDR + data_len);
            }
            let len = match i.below(3) {
                0 => i.u64() as usize,
                1 => off.min(CMSG_CAP),
                _ => i.below(CMSG_CAP + 1),
            };
            let _ = decode_tos(&buf, len);
        }
        _ => {
            let src = i.bool().then(|| Ipv4Addr::from(i.u32()));
            let tos = i.bool().then(|| i.u8());
            let (buf, len) = encode_tx(src, tos);
            assert!(len <= CMSG_CAP);
            assert_eq!(len == 0, src.is_none() && tos.is_none());
            assert_eq!(decode_tos(&buf, len), tos, "encoded {src:?} {tos:?}");
            let a = SocketAddrV4::new(Ipv4Addr::from(i.u32()), i.u16());
            let full = std::mem::size_of::<libc::sockaddr_in>() as u32;
            assert_eq!(sockaddr_round_trip(a, libc::AF_INET as u16, full), Some(a));
            let family = i.u16();
            let len = i.u32();
            let got = sockaddr_round_trip(a, family, len);
            assert_eq!(
                got.is_some(),
                family == libc::AF_INET as u16 && len >= full,
                "family {family} len {len}"
            );
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        // An IP_TOS message then an arbitrary-length one.
        vec![
            1, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 1, 0,
        ],
        vec![2, 0, 1, 1, 2, 3, 4, 1, 0xb8],
        vec![0; 40],
    ]
}
