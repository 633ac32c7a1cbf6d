//! Upstream bandwidth budget: how many simultaneous internet calls fit the configured upstream.
//!
//! Invariant: every figure is the bandwidth of one call in one direction at the IP layer —
//! RTP payload plus 40 bytes of IPv4 (20), UDP (8) and RTP (12) headers per packet, at a 20 ms
//! packet time (50 packets/s). Ethernet framing (38 bytes a frame on the wire, 18 without
//! preamble and gap), RTCP (≈5 % more, RFC 3550 §6.2), SRTP's authentication tag (10 bytes with
//! HMAC-SHA1-80, +4 kbit/s) and IPv6's longer header (+8 kbit/s) are *not* counted: configure
//! the upstream with that headroom already taken off.
//!
//! A relay channel sends one stream towards the Internet per call leg, so the upstream is the
//! link that runs out first on a home or office line; one internet call costs one stream.

use std::fmt;

/// Packet time the figures assume (RFC 3551 §4.5 default for G.711, G.722 and G.729).
pub const PTIME_MS: u32 = 20;
/// Packets per second at [`PTIME_MS`].
pub const PACKETS_PER_SECOND: u32 = 1000 / PTIME_MS;
/// IPv4 (20) + UDP (8) + RTP (12) header bytes per packet; no Ethernet framing.
pub const HEADER_BYTES: u32 = 20 + 8 + 12;

/// The codec calls are budgeted with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 (PCMA/PCMU): 64 kbit/s payload = 160 bytes per 20 ms packet;
    /// (160 + 40) bytes × 50 packets/s × 8 = 80 kbit/s.
    #[default]
    G711,
    /// G.722: 64 kbit/s payload like G.711 (RFC 3551 §4.5.2), so also 80 kbit/s.
    G722,
    /// G.729: 8 kbit/s payload = 20 bytes per 20 ms packet;
    /// (20 + 40) bytes × 50 packets/s × 8 = 24 kbit/s.
    G729,
    /// Opus is variable; budgeted at 32 kbit/s payload, inside the 28–40 kbit/s RFC 7587 §3.1.1
    /// gives for fullband speech: 80 bytes per 20 ms packet;
    /// (80 + 40) bytes × 50 packets/s × 8 = 48 kbit/s.
    Opus,
}

impl Codec {
    /// Every codec, for configuration parsers and tests.
    pub const ALL: [Codec; 4] = [Codec::G711, Codec::G722, Codec::G729, Codec::Opus];

    /// Stable lowercase name (configuration, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Codec::G711 => "g711",
            Codec::G722 => "g722",
            Codec::G729 => "g729",
            Codec::Opus => "opus",
        }
    }

    /// RTP payload bytes in one 20 ms packet.
    pub const fn payload_bytes(self) -> u32 {
        let payload_kbps = match self {
            Codec::G711 | Codec::G722 => 64,
            Codec::G729 => 8,
            Codec::Opus => 32,
        };
        // kbit/s × ms = bits; / 8 = bytes.
        payload_kbps * PTIME_MS / 8
    }

    /// Bandwidth of one call in one direction, kbit/s, headers included (see the module summary).
    pub const fn kbps(self) -> u32 {
        (self.payload_bytes() + HEADER_BYTES) * PACKETS_PER_SECOND * 8 / 1000
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Simultaneous internet calls that fit `upstream_kbps` when each costs `codec.kbps()`.
pub const fn internet_call_limit(upstream_kbps: u32, codec: Codec) -> u32 {
    upstream_kbps / codec.kbps()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_call_figures_follow_the_documented_arithmetic() {
        assert_eq!(PACKETS_PER_SECOND, 50);
        assert_eq!(HEADER_BYTES, 40);
        let expected = [
            (Codec::G711, 160, 80),
            (Codec::G722, 160, 80),
            (Codec::G729, 20, 24),
            (Codec::Opus, 80, 48),
        ];
        for (codec, payload, kbps) in expected {
            assert_eq!(codec.payload_bytes(), payload, "{codec}");
            assert_eq!(codec.kbps(), kbps, "{codec}");
        }
        assert_eq!(Codec::default(), Codec::G711);
    }

    #[test]
    fn the_limit_rounds_down_to_whole_calls() {
        assert_eq!(internet_call_limit(1000, Codec::G711), 12);
        assert_eq!(internet_call_limit(959, Codec::G711), 11);
        assert_eq!(internet_call_limit(960, Codec::G711), 12);
        assert_eq!(internet_call_limit(1000, Codec::G729), 41);
        assert_eq!(internet_call_limit(1000, Codec::Opus), 20);
        assert_eq!(internet_call_limit(79, Codec::G722), 0);
        assert_eq!(internet_call_limit(u32::MAX, Codec::G729), u32::MAX / 24);
    }

    #[test]
    fn names_are_unique_and_lowercase() {
        for (i, a) in Codec::ALL.iter().enumerate() {
            assert_eq!(a.name(), a.name().to_lowercase());
            for b in &Codec::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
