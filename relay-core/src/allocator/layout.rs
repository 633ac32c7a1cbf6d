//! Port layouts: the (relay address, even port) slots a channel pool is made of.
//!
//! Invariant: every slot of a layout has an even RTP port ≥ 1024 whose RTCP port (RTP + 1) is
//! still inside the layout's range, so a channel never straddles the end of the range; slot
//! indices `0..slots()` map one-to-one onto those slots.

use std::fmt;

use super::ConfigError;

/// Lowest port a custom layout may start at: ports below are privileged.
pub const MIN_PORT: u16 = 1024;
/// Most channels a layout may hold at once.
pub const MAX_CAPACITY: u32 = 100_000;
/// Most port pairs a layout may span over all its addresses (eight addresses with the whole
/// unprivileged range fit): bounds the allocator's memory at 64 bytes per slot.
pub const MAX_SLOTS: u32 = 1 << 18;

/// A channel's place: the relay address (an index into the shell's list of relay addresses) and
/// the even RTP port on it; RTCP uses the odd port above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// Index of the relay address; always 0 for the built-in layouts.
    pub addr_index: u16,
    /// The even RTP port.
    pub port: u16,
}

impl Slot {
    /// The RTP port (even).
    pub const fn rtp_port(self) -> u16 {
        self.port
    }

    /// The RTCP port: the odd port above the RTP port.
    pub const fn rtcp_port(self) -> u16 {
        // `| 1` rather than `+ 1`: never overflows, even for a hand-made odd slot.
        self.port | 1
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port {} on relay address #{}",
            self.port, self.addr_index
        )
    }
}

/// A pool's shape: a port range used on each of `addresses` relay addresses, and how many
/// channels may be in use at once. Every port pair of the range is a slot, so a layout may have
/// more slots than capacity (`x`: 128 pairs, 60 channels); the spare slots give the random
/// choice and the reuse quarantine room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    first_port: u16,
    last_port: u16,
    capacity: u32,
    addresses: u16,
}

impl Layout {
    /// Small systems: 60 channels on UDP 30274–30529 (128 port pairs).
    pub const X: Layout = Layout {
        first_port: 30274,
        last_port: 30529,
        capacity: 60,
        addresses: 1,
    };

    /// Server model: 180 channels on UDP 30528–30887 (180 port pairs).
    pub const S: Layout = Layout {
        first_port: 30528,
        last_port: 30887,
        capacity: 180,
        addresses: 1,
    };

    /// A custom layout: ports `first_port..=last_port` on each of `addresses` relay addresses,
    /// `capacity` channels. One address holds at most 32,256 pairs above 1024, so more than
    /// that many channels need several addresses. A trailing even `last_port` has no RTCP
    /// partner and is left unused.
    pub fn custom(
        first_port: u16,
        last_port: u16,
        capacity: u32,
        addresses: u16,
    ) -> Result<Layout, ConfigError> {
        if first_port < MIN_PORT {
            return Err(ConfigError::PrivilegedPort(first_port));
        }
        if first_port % 2 != 0 {
            return Err(ConfigError::OddFirstPort(first_port));
        }
        if last_port <= first_port {
            return Err(ConfigError::EmptyRange {
                first: first_port,
                last: last_port,
            });
        }
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(ConfigError::Capacity(capacity));
        }
        if addresses == 0 {
            return Err(ConfigError::NoAddresses);
        }
        let pairs = u64::from(last_port - first_port + 1) / 2;
        let slots = pairs * u64::from(addresses);
        if slots > u64::from(MAX_SLOTS) {
            return Err(ConfigError::TooManySlots {
                slots,
                max: MAX_SLOTS,
            });
        }
        if slots < u64::from(capacity) {
            return Err(ConfigError::RangeTooSmall {
                first: first_port,
                last: last_port,
                addresses,
                slots,
                capacity,
            });
        }
        Ok(Layout {
            first_port,
            last_port,
            capacity,
            addresses,
        })
    }

    /// First (even) port of the range.
    pub const fn first_port(&self) -> u16 {
        self.first_port
    }

    /// Last port of the range.
    pub const fn last_port(&self) -> u16 {
        self.last_port
    }

    /// Channels that may be in use at once.
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Relay addresses the range is used on.
    pub const fn addresses(&self) -> u16 {
        self.addresses
    }

    /// RTP/RTCP port pairs on one address.
    pub const fn pairs_per_address(&self) -> u32 {
        let ports = self.last_port as u32 - self.first_port as u32 + 1;
        ports / 2 // a trailing even port has no rtcp partner
    }

    /// Port pairs over all addresses: the slots the pool chooses from (≥ capacity).
    pub const fn slots(&self) -> u32 {
        self.pairs_per_address() * self.addresses as u32
    }

    /// The slot with index `index` (`< slots()`); addresses are filled one after the other.
    pub(crate) fn slot_at(&self, index: u32) -> Slot {
        let pairs = self.pairs_per_address();
        // Both fit: index < slots() ≤ u16::MAX × pairs, and the offset stays inside the range.
        Slot {
            addr_index: (index / pairs) as u16,
            port: self.first_port + 2 * (index % pairs) as u16,
        }
    }

    /// The index of `slot`, or `None` if the slot is not part of this layout.
    pub(crate) fn index_of(&self, slot: Slot) -> Option<u32> {
        if slot.addr_index >= self.addresses || slot.port < self.first_port {
            return None;
        }
        let offset = u32::from(slot.port - self.first_port);
        let pairs = self.pairs_per_address();
        if offset % 2 != 0 || offset / 2 >= pairs {
            return None;
        }
        Some(u32::from(slot.addr_index) * pairs + offset / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_layouts_have_the_documented_shape() {
        assert_eq!(Layout::X.capacity(), 60);
        assert_eq!(Layout::X.slots(), 128);
        assert_eq!(Layout::S.capacity(), 180);
        assert_eq!(Layout::S.slots(), 180);
        // The built-in constants bypass `custom`; they must pass its checks all the same.
        for l in [Layout::X, Layout::S] {
            let again = Layout::custom(l.first_port(), l.last_port(), l.capacity(), 1);
            assert_eq!(again, Ok(l));
        }
    }

    #[test]
    fn every_slot_is_an_even_port_with_its_rtcp_port_in_range() {
        for l in [Layout::X, Layout::S] {
            for i in 0..l.slots() {
                let s = l.slot_at(i);
                assert_eq!(s.addr_index, 0);
                assert_eq!(s.rtp_port() % 2, 0, "{s}");
                assert!(s.rtp_port() >= l.first_port(), "{s}");
                assert!(s.rtcp_port() <= l.last_port(), "{s}");
                assert_eq!(s.rtcp_port(), s.rtp_port() + 1);
                assert_eq!(l.index_of(s), Some(i));
            }
        }
    }

    #[test]
    fn index_of_rejects_foreign_slots() {
        let l = Layout::S;
        for (addr_index, port) in [
            (0, 30526),
            (0, 30529),
            (0, 30888),
            (0, 30886 + 2),
            (1, 30528),
        ] {
            assert_eq!(l.index_of(Slot { addr_index, port }), None, "{port}");
        }
        assert_eq!(
            l.index_of(Slot {
                addr_index: 0,
                port: 30886
            }),
            Some(179)
        );
    }

    #[test]
    fn several_addresses_hold_a_hundred_thousand_channels() {
        // One address has 32,256 pairs above 1024: four are needed for 100,000 channels.
        assert!(matches!(
            Layout::custom(1024, 65535, 100_000, 3),
            Err(ConfigError::RangeTooSmall { slots: 96_768, .. })
        ));
        let l = Layout::custom(1024, 65535, 100_000, 4).expect("four addresses suffice");
        assert_eq!(l.pairs_per_address(), 32_256);
        assert_eq!(l.slots(), 129_024);
        let last = l.slot_at(l.slots() - 1);
        assert_eq!(
            last,
            Slot {
                addr_index: 3,
                port: 65534
            }
        );
        assert_eq!(last.rtcp_port(), 65535);
        assert_eq!(
            l.slot_at(32_256),
            Slot {
                addr_index: 1,
                port: 1024
            }
        );
        assert_eq!(l.index_of(last), Some(l.slots() - 1));
    }

    #[test]
    fn custom_layouts_are_validated() {
        let cases = [
            (
                Layout::custom(1022, 2000, 10, 1),
                "first port 1022 is below 1024",
            ),
            (
                Layout::custom(20001, 20100, 10, 1),
                "first port 20001 is odd: an rtp port must be even",
            ),
            (
                Layout::custom(20000, 20000, 1, 1),
                "port range 20000-20000 holds no rtp/rtcp port pair",
            ),
            (
                Layout::custom(20000, 20099, 0, 1),
                "capacity 0 is outside 1..=100000",
            ),
            (
                Layout::custom(20000, 65535, 100_001, 8),
                "capacity 100001 is outside 1..=100000",
            ),
            (
                Layout::custom(20000, 20099, 10, 0),
                "a layout needs at least one relay address",
            ),
            (
                Layout::custom(20000, 20018, 10, 1),
                "port range 20000-20018 on 1 relay address(es) has 9 port pairs, \
                 fewer than the capacity of 10 channels",
            ),
            (
                Layout::custom(1024, 65535, 1, 9),
                "layout spans 290304 port pairs, more than the supported 262144",
            ),
        ];
        for (result, message) in cases {
            assert_eq!(result.map_err(|e| e.to_string()), Err(message.to_owned()));
        }
    }

    #[test]
    fn a_trailing_even_port_is_left_unused() {
        let l = Layout::custom(20000, 20020, 10, 1).expect("valid");
        assert_eq!(l.slots(), 10);
        assert_eq!(l.slot_at(9).rtcp_port(), 20019);
        assert_eq!(
            l.index_of(Slot {
                addr_index: 0,
                port: 20020
            }),
            None
        );
    }
}
