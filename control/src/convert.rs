//! Conversions between the wire types of `relay.v1` and the service's domain types, in one
//! place. Requests are checked here: an error names the request field it is about
//! (`leg_a.rtp_address: "x" is not IP:PORT`), so the service sees only well-formed values.
//!
//! Invariant: every enum conversion is an exhaustive match in both directions, so adding a
//! kind, state or event on either side fails to compile until it is mapped.
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use proto::v1 as pb;
use relay_common::{Endpoint, Leg};
use relay_user::forward::Component;

use relay_core::{ChannelSpec, ChannelState, EventKind, Kind, LatchingPolicy, LegSpec, Request};

use crate::error::ServiceError;
use crate::service::{ChannelRef, ChannelView, Event, ListQuery, PoolView, Update};

/// Page size when a List request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page a List request may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Prefix of page tokens (the rest is the last port of the previous page). Tokens are opaque to
/// clients; the prefix lets the format change without misreading old tokens.
const PAGE_TOKEN_PREFIX: &str = "p1.";

/// A kind from the wire; `UNSPECIFIED` and unknown numbers are errors naming `field`.
pub fn kind_from_pb(value: i32, field: &str) -> Result<Kind, ServiceError> {
    match pb::ChannelKind::try_from(value) {
        Ok(pb::ChannelKind::ItspCall) => Ok(Kind::ItspCall),
        Ok(pb::ChannelKind::CircuitCall) => Ok(Kind::CircuitCall),
        Ok(pb::ChannelKind::SystemDevice) => Ok(Kind::SystemDevice),
        Ok(pb::ChannelKind::SipDevice) => Ok(Kind::SipDevice),
        Ok(pb::ChannelKind::MobileClient) => Ok(Kind::MobileClient),
        Ok(pb::ChannelKind::Unspecified) => Err(ServiceError::invalid(field, "a kind is required")),
        Err(_) => Err(ServiceError::invalid(
            field,
            format!("unknown kind {value}"),
        )),
    }
}

/// A kind for the wire.
pub fn kind_to_pb(kind: Kind) -> pb::ChannelKind {
    match kind {
        Kind::ItspCall => pb::ChannelKind::ItspCall,
        Kind::CircuitCall => pb::ChannelKind::CircuitCall,
        Kind::SystemDevice => pb::ChannelKind::SystemDevice,
        Kind::SipDevice => pb::ChannelKind::SipDevice,
        Kind::MobileClient => pb::ChannelKind::MobileClient,
    }
}

/// A state from the wire (a filter value).
pub fn state_from_pb(value: i32, field: &str) -> Result<ChannelState, ServiceError> {
    match pb::ChannelState::try_from(value) {
        Ok(s) => state_of_pb(s).ok_or_else(|| {
            ServiceError::invalid(field, "CHANNEL_STATE_UNSPECIFIED is not a state")
        }),
        Err(_) => Err(ServiceError::invalid(
            field,
            format!("unknown state {value}"),
        )),
    }
}

/// The state a wire state stands for; `None` for `UNSPECIFIED`.
pub fn state_of_pb(state: pb::ChannelState) -> Option<ChannelState> {
    match state {
        pb::ChannelState::Waiting => Some(ChannelState::Waiting),
        pb::ChannelState::Latched => Some(ChannelState::Latched),
        pb::ChannelState::FastPath => Some(ChannelState::FastPath),
        pb::ChannelState::Unspecified => None,
    }
}

/// A state for the wire.
pub fn state_to_pb(state: ChannelState) -> pb::ChannelState {
    match state {
        ChannelState::Waiting => pb::ChannelState::Waiting,
        ChannelState::Latched => pb::ChannelState::Latched,
        ChannelState::FastPath => pb::ChannelState::FastPath,
    }
}

fn latching_from_pb(
    p: Option<&pb::LatchingPolicy>,
    field: &str,
) -> Result<Option<LatchingPolicy>, ServiceError> {
    let Some(p) = p else { return Ok(None) };
    let duration =
        duration_from_pb(p.duration.as_ref(), &format!("{field}.duration"))?.unwrap_or_default();
    match pb::LatchMode::try_from(p.mode) {
        Ok(pb::LatchMode::Unspecified | pb::LatchMode::FirstPacket) => {
            Ok(Some(LatchingPolicy::FirstPacket))
        }
        Ok(pb::LatchMode::After) => Ok(Some(LatchingPolicy::After {
            packets: p.packets,
            duration,
        })),
        Ok(pb::LatchMode::Strict) => Ok(Some(LatchingPolicy::Strict)),
        Ok(pb::LatchMode::Handover) => Ok(Some(LatchingPolicy::Handover { silence: duration })),
        Err(_) => Err(ServiceError::invalid(
            format!("{field}.mode"),
            format!("unknown latch mode {}", p.mode),
        )),
    }
}

fn latching_to_pb(l: LatchingPolicy) -> pb::LatchingPolicy {
    let (mode, packets, duration) = match l {
        LatchingPolicy::FirstPacket => (pb::LatchMode::FirstPacket, 0, None),
        LatchingPolicy::After { packets, duration } => {
            (pb::LatchMode::After, packets, Some(duration))
        }
        LatchingPolicy::Strict => (pb::LatchMode::Strict, 0, None),
        LatchingPolicy::Handover { silence } => (pb::LatchMode::Handover, 0, Some(silence)),
    };
    pb::LatchingPolicy {
        mode: mode as i32,
        packets,
        duration: duration.map(duration_to_pb),
    }
}

fn socket_addr(s: &str, field: &str) -> Result<Option<SocketAddr>, ServiceError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ServiceError::invalid(field, format!("{s:?} is not IP:PORT")))
}

fn leg_from_pb(leg: Option<&pb::LegSpec>, field: &str) -> Result<Option<LegSpec>, ServiceError> {
    let Some(leg) = leg else { return Ok(None) };
    let relay_addr = if leg.relay_address.is_empty() {
        None
    } else {
        let ip: IpAddr = leg.relay_address.parse().map_err(|_| {
            ServiceError::invalid(
                format!("{field}.relay_address"),
                format!("{:?} is not an IP address", leg.relay_address),
            )
        })?;
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => Some(v6.to_ipv4_mapped().ok_or_else(|| {
                ServiceError::invalid(
                    format!("{field}.relay_address"),
                    format!("{ip}: the relay sends from IPv4 addresses only"),
                )
            })?),
        }
    };
    Ok(Some(LegSpec {
        rtp: socket_addr(&leg.rtp_address, &format!("{field}.rtp_address"))?,
        rtcp: socket_addr(&leg.rtcp_address, &format!("{field}.rtcp_address"))?,
        strict: leg.strict,
        relay_addr,
    }))
}

fn duration_from_pb(
    d: Option<&prost_types::Duration>,
    field: &str,
) -> Result<Option<Duration>, ServiceError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ServiceError::invalid(field, "must be a positive duration"));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// An Allocate request as the allocator's request and the channel spec.
pub fn allocate_from_pb(r: &pb::AllocateRequest) -> Result<(Request, ChannelSpec), ServiceError> {
    let leg = r.call_leg.clone().unwrap_or_default();
    if leg.call_id.is_empty() {
        return Err(ServiceError::invalid("call_leg.call_id", "required"));
    }
    let mut request = Request::new(leg.call_id, leg.leg_tag, kind_from_pb(r.kind, "kind")?)
        .with_internet(r.internet.unwrap_or(true));
    if let Some(t) = duration_from_pb(r.timeout.as_ref(), "timeout")? {
        request = request.with_timeout(t);
    }
    let spec = ChannelSpec {
        legs: [
            leg_from_pb(r.leg_a.as_ref(), "leg_a")?.unwrap_or_default(),
            leg_from_pb(r.leg_b.as_ref(), "leg_b")?.unwrap_or_default(),
        ],
        latching: latching_from_pb(r.latching.as_ref(), "latching")?.unwrap_or_default(),
        latch_any_payload: r.latch_any_payload,
        clock_rate: r.clock_rate,
    };
    Ok((request, spec))
}

/// The channel a request names.
pub fn channel_ref_from_pb(r: Option<&pb::ChannelRef>) -> Result<ChannelRef, ServiceError> {
    use pb::channel_ref::Target;
    match r.and_then(|r| r.target.as_ref()) {
        None => Err(ServiceError::invalid(
            "channel",
            "a port or a call leg is required",
        )),
        Some(Target::Port(p)) => u16::try_from(*p)
            .ok()
            .filter(|p| p % 2 == 0)
            .map(ChannelRef::Port)
            .ok_or_else(|| {
                ServiceError::invalid("channel.port", format!("{p} is not an even UDP port"))
            }),
        Some(Target::CallLeg(l)) => {
            if l.call_id.is_empty() {
                return Err(ServiceError::invalid(
                    "channel.call_leg.call_id",
                    "required",
                ));
            }
            Ok(ChannelRef::Leg {
                call_id: l.call_id.clone(),
                leg_tag: l.leg_tag.clone(),
            })
        }
    }
}

/// An Update request.
pub fn update_from_pb(r: &pb::UpdateRequest) -> Result<(ChannelRef, Update), ServiceError> {
    let target = channel_ref_from_pb(r.channel.as_ref())?;
    let update = Update {
        legs: [
            leg_from_pb(r.leg_a.as_ref(), "leg_a")?,
            leg_from_pb(r.leg_b.as_ref(), "leg_b")?,
        ],
        latching: latching_from_pb(r.latching.as_ref(), "latching")?,
        timeout: duration_from_pb(r.timeout.as_ref(), "timeout")?,
        clock_rate: r.clock_rate,
    };
    Ok((target, update))
}

/// A List request.
pub fn list_from_pb(r: &pb::ListRequest) -> Result<ListQuery, ServiceError> {
    if r.page_size > MAX_PAGE_SIZE {
        return Err(ServiceError::invalid(
            "page_size",
            format!("{} is more than {MAX_PAGE_SIZE}", r.page_size),
        ));
    }
    let limit = if r.page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        r.page_size
    };
    let after = if r.page_token.is_empty() {
        None
    } else {
        Some(
            r.page_token
                .strip_prefix(PAGE_TOKEN_PREFIX)
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| {
                    ServiceError::invalid("page_token", "not a token from a previous ListResponse")
                })?,
        )
    };
    let kinds = kinds_from_pb(&r.kinds)?;
    check_filter_len("states", r.states.len(), ChannelState::ALL.len(), "states")?;
    let states = r
        .states
        .iter()
        .map(|&s| state_from_pb(s, "states"))
        .collect::<Result<_, _>>()?;
    Ok(ListQuery {
        limit: limit as usize,
        after,
        kinds,
        states,
    })
}

/// The token of the page after the one ending at port `after`.
pub fn page_token(after: Option<u16>) -> String {
    after.map_or_else(String::new, |p| format!("{PAGE_TOKEN_PREFIX}{p}"))
}

/// The kinds filter of a Watch request.
pub fn watch_kinds_from_pb(r: &pb::WatchRequest) -> Result<Vec<Kind>, ServiceError> {
    kinds_from_pb(&r.kinds)
}

/// A filter names each value at most once in sense, so it has at most as many entries as there
/// are values: a longer one is refused rather than scanned for every channel or event.
fn check_filter_len(
    field: &str,
    len: usize,
    values: usize,
    what: &str,
) -> Result<(), ServiceError> {
    if len > values {
        return Err(ServiceError::invalid(
            field,
            format!("{len} entries, more than the {values} {what} there are"),
        ));
    }
    Ok(())
}

fn kinds_from_pb(kinds: &[i32]) -> Result<Vec<Kind>, ServiceError> {
    check_filter_len("kinds", kinds.len(), Kind::ALL.len(), "kinds")?;
    kinds.iter().map(|&k| kind_from_pb(k, "kinds")).collect()
}

fn endpoint_to_pb(e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        address: e.socket_addr().map(|a| a.to_string()).unwrap_or_default(),
        latched: e.is_latched(),
    }
}

fn leg_to_pb(l: &Leg, public: Option<SocketAddr>) -> pb::Leg {
    pb::Leg {
        relay_address: l.local().to_string(),
        rtp: Some(endpoint_to_pb(&l.rtp)),
        rtcp: Some(endpoint_to_pb(&l.rtcp)),
        public_address: public.map(|a| a.to_string()).unwrap_or_default(),
    }
}

/// A channel for the wire.
pub fn channel_to_pb(v: &ChannelView) -> pb::Channel {
    let clock = &v.clock;
    let clock_rate = v.channel.effective_clock_rate();
    let dir = |i: usize| {
        let d = &v.stats.from_leg[i];
        pb::DirectionStats {
            packets: d.packets,
            bytes: d.bytes,
            last_seen: clock.wall_of_ns(d.last_seen_ns).map(timestamp),
            lost: d.rtp.lost(),
            reordered: d.rtp.reordered,
            jitter: d.rtp.jitter(),
            jitter_ms: d.rtp.jitter_ms(clock_rate),
            rtp_packets: d.rtp.received,
        }
    };
    pb::Channel {
        port: u32::from(v.port()),
        id: v.info.id.0,
        call_leg: Some(pb::CallLeg {
            call_id: v.info.call_id.clone(),
            leg_tag: v.info.leg_tag.clone(),
        }),
        kind: kind_to_pb(v.info.kind) as i32,
        internet: v.info.internet,
        state: state_to_pb(v.state) as i32,
        leg_a: Some(leg_to_pb(&v.channel.legs[0], v.public_media)),
        leg_b: Some(leg_to_pb(&v.channel.legs[1], None)),
        latching: Some(latching_to_pb(v.latching)),
        timeout: Some(duration_to_pb(v.info.timeout)),
        allocated_at: Some(timestamp(clock.wall_of_instant(v.info.allocated_at))),
        stats: Some(pb::ChannelStats {
            from_a: Some(dir(0)),
            from_b: Some(dir(1)),
        }),
        clock_rate,
        latch_any_payload: !v.channel.latching.media_only(),
    }
}

/// An event kind for the wire.
pub fn event_kind_to_pb(kind: EventKind) -> pb::EventType {
    match kind {
        EventKind::Allocated => pb::EventType::Allocated,
        EventKind::Latched => pb::EventType::Latched,
        EventKind::FastPath => pb::EventType::FastPath,
        EventKind::IdleTimeout => pb::EventType::IdleTimeout,
        EventKind::Released => pb::EventType::Released,
    }
}

/// The event kind a wire event type stands for; `None` for `UNSPECIFIED`.
pub fn event_kind_of_pb(ty: pb::EventType) -> Option<EventKind> {
    match ty {
        pb::EventType::Allocated => Some(EventKind::Allocated),
        pb::EventType::Latched => Some(EventKind::Latched),
        pb::EventType::FastPath => Some(EventKind::FastPath),
        pb::EventType::IdleTimeout => Some(EventKind::IdleTimeout),
        pb::EventType::Released => Some(EventKind::Released),
        pb::EventType::Unspecified => None,
    }
}

/// An event for the wire.
pub fn event_to_pb(e: &Event) -> pb::WatchResponse {
    let latch = e.latch.map(|l| pb::Latch {
        leg: if l.leg == 0 {
            pb::LegId::A
        } else {
            pb::LegId::B
        } as i32,
        component: match l.component {
            Component::Rtp => pb::Component::Rtp,
            Component::Rtcp => pb::Component::Rtcp,
        } as i32,
        address: l.source.to_string(),
    });
    pb::WatchResponse {
        r#type: event_kind_to_pb(e.kind) as i32,
        channel: Some(channel_to_pb(&e.channel)),
        at: Some(timestamp(e.at)),
        latch,
    }
}

/// The pool for the wire.
pub fn pool_to_pb(p: &PoolView) -> pb::PoolStatusResponse {
    let s = &p.status;
    pb::PoolStatusResponse {
        layout: Some(pb::Layout {
            name: p.layout_name.to_owned(),
            first_port: u32::from(p.layout.first_port()),
            last_port: u32::from(p.layout.last_port()),
            capacity: p.layout.capacity(),
            slots: p.layout.slots(),
        }),
        in_use: s.in_use,
        in_use_by_kind: s
            .in_use_by_kind
            .iter()
            .map(|(kind, in_use)| pb::KindUsage {
                kind: kind_to_pb(kind) as i32,
                in_use,
            })
            .collect(),
        quarantined: s.quarantined,
        free: s.free,
        internet_calls: s.internet_calls,
        bandwidth_limit: match (p.upstream_kbps, s.internet_call_limit) {
            (Some(upstream_kbps), Some(limit)) => Some(pb::BandwidthLimit {
                upstream_kbps,
                codec: p.codec.name().to_owned(),
                per_call_kbps: p.codec.kbps(),
                internet_call_limit: limit,
            }),
            _ => None,
        },
        early_reuses: s.early_reuses,
        data_path: p.data_path.to_owned(),
        fast_path_unavailable: p.fast_path_unavailable.clone().unwrap_or_default(),
        fast_path_degraded: p.fast_path_degraded.clone().unwrap_or_default(),
        instance_id: p.instance.id.clone(),
        started_at: Some(timestamp(p.instance.started_at)),
        adopted_at_start: p.instance.adopted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn kinds_round_trip_and_unspecified_is_rejected() {
        for kind in Kind::ALL {
            assert_eq!(
                kind_from_pb(kind_to_pb(kind) as i32, "kind").ok(),
                Some(kind)
            );
        }
        let e = kind_from_pb(0, "kind").expect_err("unspecified");
        assert_eq!(e.to_string(), "kind: a kind is required");
        let e = kind_from_pb(99, "kinds").expect_err("unknown");
        assert_eq!(e.to_string(), "kinds: unknown kind 99");
    }

    #[test]
    fn allocate_requests_are_checked_field_by_field() {
        let ok = pb::AllocateRequest {
            call_leg: Some(pb::CallLeg {
                call_id: "c1".into(),
                leg_tag: "t1".into(),
            }),
            kind: pb::ChannelKind::SipDevice as i32,
            leg_b: Some(pb::LegSpec {
                rtp_address: "192.0.2.10:6000".into(),
                strict: true,
                relay_address: "::ffff:192.0.2.1".into(),
                ..Default::default()
            }),
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..Default::default()
        };
        let (request, spec) = allocate_from_pb(&ok).expect("valid");
        assert!(request.internet, "unset counts as an internet call");
        assert_eq!(request.timeout, Some(Duration::from_secs(30)));
        assert_eq!(spec.legs[1].relay_addr, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(spec.legs[0], LegSpec::default());

        let mut bad = ok.clone();
        bad.call_leg = None;
        assert_eq!(
            allocate_from_pb(&bad).expect_err("no call id").to_string(),
            "call_leg.call_id: required"
        );
        let mut bad = ok.clone();
        bad.leg_b.as_mut().expect("leg b").rtp_address = "192.0.2.10".into();
        assert_eq!(
            allocate_from_pb(&bad).expect_err("no port").to_string(),
            "leg_b.rtp_address: \"192.0.2.10\" is not IP:PORT"
        );
        let mut bad = ok.clone();
        bad.leg_b.as_mut().expect("leg b").relay_address = "2001:db8::1".into();
        assert_eq!(
            allocate_from_pb(&bad).expect_err("v6").to_string(),
            "leg_b.relay_address: 2001:db8::1: the relay sends from IPv4 addresses only"
        );
        let mut bad = ok.clone();
        bad.timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(
            allocate_from_pb(&bad).expect_err("negative").to_string(),
            "timeout: must be a positive duration"
        );
        let mut bad = ok;
        bad.latching = Some(pb::LatchingPolicy {
            mode: 42,
            ..Default::default()
        });
        assert_eq!(
            allocate_from_pb(&bad).expect_err("mode").to_string(),
            "latching.mode: unknown latch mode 42"
        );
    }

    #[test]
    fn latching_policies_round_trip() {
        for l in [
            LatchingPolicy::FirstPacket,
            LatchingPolicy::After {
                packets: 5,
                duration: Duration::from_millis(300),
            },
            LatchingPolicy::Strict,
            LatchingPolicy::Handover {
                silence: Duration::from_secs(2),
            },
        ] {
            let wire = latching_to_pb(l);
            assert_eq!(
                latching_from_pb(Some(&wire), "latching").ok(),
                Some(Some(l))
            );
        }
        let bad = pb::LatchingPolicy {
            mode: pb::LatchMode::Handover as i32,
            packets: 0,
            duration: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        };
        assert_eq!(
            latching_from_pb(Some(&bad), "latching")
                .expect_err("negative")
                .to_string(),
            "latching.duration: must be a positive duration"
        );
    }

    #[test]
    fn channel_refs_need_an_even_port_or_a_call_id() {
        use pb::channel_ref::Target;
        let r = |t| Some(pb::ChannelRef { target: Some(t) });
        assert_eq!(
            channel_ref_from_pb(r(Target::Port(30530)).as_ref()).ok(),
            Some(ChannelRef::Port(30530))
        );
        for bad in [Target::Port(30531), Target::Port(70000)] {
            let e = channel_ref_from_pb(r(bad).as_ref()).expect_err("bad port");
            assert!(e.to_string().starts_with("channel.port: "), "{e}");
        }
        let e = channel_ref_from_pb(None).expect_err("missing");
        assert_eq!(e.to_string(), "channel: a port or a call leg is required");
        let e = channel_ref_from_pb(r(Target::CallLeg(pb::CallLeg::default())).as_ref())
            .expect_err("empty call id");
        assert_eq!(e.to_string(), "channel.call_leg.call_id: required");
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let q = list_from_pb(&pb::ListRequest {
            page_token: page_token(Some(30530)),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            (q.after, q.limit),
            (Some(30530), DEFAULT_PAGE_SIZE as usize)
        );
        assert_eq!(page_token(None), "");
        for token in ["30530", "p1.x", "p1.70000"] {
            let e = list_from_pb(&pb::ListRequest {
                page_token: token.into(),
                ..Default::default()
            })
            .expect_err(token);
            assert!(e.to_string().starts_with("page_token: "), "{e}");
        }
        let e = list_from_pb(&pb::ListRequest {
            page_size: 1001,
            ..Default::default()
        })
        .expect_err("too big");
        assert_eq!(e.to_string(), "page_size: 1001 is more than 1000");

        let e = list_from_pb(&pb::ListRequest {
            kinds: vec![pb::ChannelKind::SipDevice as i32; 6],
            ..Default::default()
        })
        .expect_err("too many kinds");
        assert_eq!(
            e.to_string(),
            "kinds: 6 entries, more than the 5 kinds there are"
        );
        let e = list_from_pb(&pb::ListRequest {
            states: vec![pb::ChannelState::Waiting as i32; 4],
            ..Default::default()
        })
        .expect_err("too many states");
        assert_eq!(
            e.to_string(),
            "states: 4 entries, more than the 3 states there are"
        );
        let e = watch_kinds_from_pb(&pb::WatchRequest {
            kinds: vec![pb::ChannelKind::SipDevice as i32; 6],
        })
        .expect_err("too many kinds");
        assert!(e.to_string().starts_with("kinds: 6 entries"), "{e}");
    }
}
