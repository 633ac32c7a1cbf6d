//! The on-disk form of a live channel: what the service writes to the store (`relay-store`)
//! before it changes the data path, and reads back at start to adopt the channels a previous
//! process left in the pinned XDP maps.
//!
//! The invariant a reader must know: **the record format is a contract with older and newer
//! daemons**, separate from the domain types, so a refactoring of `ChannelSpec` cannot silently
//! change what is on disk. Every field is named; enums are stored by their stable names;
//! durations in milliseconds; times as Unix milliseconds (an `Instant` means nothing to the next
//! process). A record this build cannot read is reported and its channel removed, never guessed.
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use relay_core::allocator::{ChannelInfo, Kind};
use relay_core::{ChannelSpec, LatchingPolicy, LegSpec};

/// Version of the record layout below; a newer one is refused by older daemons.
pub const RECORD_VERSION: u32 = 1;

/// One live channel as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredChannel {
    pub version: u32,
    pub id: u64,
    pub call_id: String,
    pub leg_tag: String,
    /// [`Kind::name`].
    pub kind: String,
    pub internet: bool,
    pub timeout_ms: u64,
    /// When the channel was allocated (Unix time, ms).
    pub allocated_unix_ms: u64,
    pub legs: [StoredLeg; 2],
    pub latching: StoredLatching,
    /// [`ChannelSpec::latch_any_payload`]. Absent from records written before media-only
    /// latching existed, whose channels latched on any payload: read as `true`.
    #[serde(default = "any_payload_before_it_was_recorded")]
    pub latch_any_payload: bool,
    pub clock_rate: u32,
}

fn any_payload_before_it_was_recorded() -> bool {
    true
}

/// One leg as requested (not as learnt: the data path keeps what it learnt).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredLeg {
    pub rtp: Option<SocketAddr>,
    pub rtcp: Option<SocketAddr>,
    pub strict: bool,
    pub relay_addr: Option<Ipv4Addr>,
}

/// The latching policy by name, with its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "snake_case")]
pub enum StoredLatching {
    FirstPacket,
    After { packets: u32, duration_ms: u64 },
    Strict,
    Handover { silence_ms: u64 },
}

/// Why a stored record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("unreadable channel record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("channel record version {0} is newer than this build reads ({RECORD_VERSION})")]
    Version(u32),
    #[error("channel record names an unknown kind {0:?}")]
    Kind(String),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, ms)
}

impl StoredChannel {
    /// The record of a live channel; `allocated` is its allocation time on the wall clock.
    pub fn new(info: &ChannelInfo, spec: &ChannelSpec, allocated: SystemTime) -> StoredChannel {
        let leg = |l: &LegSpec| StoredLeg {
            rtp: l.rtp,
            rtcp: l.rtcp,
            strict: l.strict,
            relay_addr: l.relay_addr,
        };
        StoredChannel {
            version: RECORD_VERSION,
            id: info.id.0,
            call_id: info.call_id.clone(),
            leg_tag: info.leg_tag.clone(),
            kind: info.kind.name().to_owned(),
            internet: info.internet,
            timeout_ms: ms(info.timeout),
            allocated_unix_ms: unix_ms(allocated),
            legs: [leg(&spec.legs[0]), leg(&spec.legs[1])],
            latching: match spec.latching {
                LatchingPolicy::FirstPacket => StoredLatching::FirstPacket,
                LatchingPolicy::After { packets, duration } => StoredLatching::After {
                    packets,
                    duration_ms: ms(duration),
                },
                LatchingPolicy::Strict => StoredLatching::Strict,
                LatchingPolicy::Handover { silence } => StoredLatching::Handover {
                    silence_ms: ms(silence),
                },
            },
            latch_any_payload: spec.latch_any_payload,
            clock_rate: spec.clock_rate,
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<StoredChannel, RecordError> {
        // The version first, so a newer record says so instead of failing on a new field.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_str(text)?;
        if v.version > RECORD_VERSION {
            return Err(RecordError::Version(v.version));
        }
        Ok(serde_json::from_str(text)?)
    }

    pub fn kind(&self) -> Result<Kind, RecordError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == self.kind)
            .ok_or_else(|| RecordError::Kind(self.kind.clone()))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn allocated(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.allocated_unix_ms)
    }

    /// The channel as it was requested.
    pub fn spec(&self) -> ChannelSpec {
        let leg = |l: &StoredLeg| LegSpec {
            rtp: l.rtp,
            rtcp: l.rtcp,
            strict: l.strict,
            relay_addr: l.relay_addr,
        };
        ChannelSpec {
            legs: [leg(&self.legs[0]), leg(&self.legs[1])],
            latching: match self.latching {
                StoredLatching::FirstPacket => LatchingPolicy::FirstPacket,
                StoredLatching::After {
                    packets,
                    duration_ms,
                } => LatchingPolicy::After {
                    packets,
                    duration: Duration::from_millis(duration_ms),
                },
                StoredLatching::Strict => LatchingPolicy::Strict,
                StoredLatching::Handover { silence_ms } => LatchingPolicy::Handover {
                    silence: Duration::from_millis(silence_ms),
                },
            },
            latch_any_payload: self.latch_any_payload,
            clock_rate: self.clock_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use std::time::Instant;

    use super::*;
    use relay_core::allocator::{ChannelId, Slot};

    fn info() -> ChannelInfo {
        let now = Instant::now();
        ChannelInfo {
            id: ChannelId(42 << 40 | 7),
            slot: Slot {
                addr_index: 0,
                port: 30528,
            },
            call_id: "call-1@pbx".into(),
            leg_tag: "a".into(),
            kind: Kind::SipDevice,
            internet: true,
            timeout: Duration::from_secs(90),
            allocated_at: now,
            last_activity: now,
        }
    }

    #[test]
    fn a_record_round_trips_every_policy() {
        for latching in [
            LatchingPolicy::FirstPacket,
            LatchingPolicy::After {
                packets: 3,
                duration: Duration::from_millis(250),
            },
            LatchingPolicy::Strict,
            LatchingPolicy::Handover {
                silence: Duration::from_secs(2),
            },
        ] {
            let spec = ChannelSpec {
                legs: [
                    LegSpec {
                        rtp: Some("203.0.113.10:5004".parse().unwrap()),
                        rtcp: None,
                        strict: false,
                        relay_addr: Some("198.51.100.1".parse().unwrap()),
                    },
                    LegSpec {
                        rtp: Some("192.0.2.10:6000".parse().unwrap()),
                        rtcp: Some("192.0.2.10:6003".parse().unwrap()),
                        strict: true,
                        relay_addr: None,
                    },
                ],
                latching,
                latch_any_payload: false,
                clock_rate: 48_000,
            };
            let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
            let stored = StoredChannel::new(&info(), &spec, at);
            let back = StoredChannel::from_json(&stored.to_json()).unwrap();
            assert_eq!(back, stored);
            assert_eq!(back.spec(), spec);
            assert_eq!(back.kind().unwrap(), Kind::SipDevice);
            assert_eq!(back.timeout(), Duration::from_secs(90));
            assert_eq!(back.allocated(), at);
        }
    }

    #[test]
    fn unreadable_records_are_refused_with_the_reason() {
        let mut stored = StoredChannel::new(&info(), &ChannelSpec::default(), SystemTime::now());
        stored.version = RECORD_VERSION + 1;
        let err = StoredChannel::from_json(&stored.to_json()).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
        stored.version = RECORD_VERSION;
        stored.kind = "teleporter".into();
        assert!(matches!(
            StoredChannel::from_json(&stored.to_json()).unwrap().kind(),
            Err(RecordError::Kind(_))
        ));
        assert!(StoredChannel::from_json("{\"version\":1}").is_err());
        assert!(StoredChannel::from_json("not json").is_err());
    }

    #[test]
    fn a_record_from_before_media_only_latching_keeps_latching_on_any_payload() {
        let spec = ChannelSpec::default();
        let stored = StoredChannel::new(&info(), &spec, SystemTime::now());
        let mut json: serde_json::Value = serde_json::from_str(&stored.to_json()).unwrap();
        json.as_object_mut().unwrap().remove("latch_any_payload");
        let back = StoredChannel::from_json(&json.to_string()).unwrap();
        assert!(back.spec().latch_any_payload);
        assert!(!stored.spec().latch_any_payload);
    }
}
