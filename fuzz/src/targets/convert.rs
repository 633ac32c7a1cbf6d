//! Request conversion (`control/src/convert.rs`): any protobuf request decoded from bytes, or
//! built field by field from a dictionary of plausible and broken values, converts to domain
//! types or fails with `InvalidArgument` naming a field of the request; a converted Allocate
//! spec validates or names a field too. Never a panic.
use control::convert;
use control::error::ServiceError;
use prost::Message;
use proto::v1 as pb;

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "convert",
    run,
    seeds,
};

/// Every field a conversion error may name.
const FIELDS: &[&str] = &[
    "call_leg.call_id",
    "kind",
    "kinds",
    "states",
    "timeout",
    "latching.duration",
    "latching.mode",
    "channel",
    "channel.port",
    "channel.call_leg.call_id",
    "page_size",
    "page_token",
    "clock_rate",
    "leg_a.relay_address",
    "leg_a.rtp_address",
    "leg_a.rtcp_address",
    "leg_b.relay_address",
    "leg_b.rtp_address",
    "leg_b.rtcp_address",
];

fn check_field(field: &str, what: &str) {
    assert!(
        FIELDS.contains(&field),
        "{what}: error names {field:?}, not a request field"
    );
}

fn check<T>(r: Result<T, ServiceError>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(ServiceError::InvalidArgument { field, reason }) => {
            check_field(&field, what);
            assert!(!reason.is_empty());
            None
        }
        Err(e) => panic!("{what}: a conversion failed with {e:?}, not InvalidArgument"),
    }
}

const ADDRS: &[&str] = &[
    "",
    "192.0.2.10:6000",
    "[2001:db8::1]:5004",
    "[::ffff:192.0.2.1]:1",
    "0.0.0.0:0",
    "198.51.100.10:65535",
    "198.51.100.10",
    "192.0.2.1",
    "::ffff:10.0.0.1",
    "2001:db8::1",
    "x",
    "1.2.3.4:99999",
    "[::]:0",
];

fn string(i: &mut Input, dict: &[&str]) -> String {
    if i.below(6) == 0 {
        String::from_utf8_lossy(i.bytes(24)).into_owned()
    } else {
        i.pick(dict).to_owned()
    }
}

fn duration(i: &mut Input) -> Option<prost_types::Duration> {
    i.bool().then(|| prost_types::Duration {
        seconds: i.pick(&[0, 1, 86_400, 86_401, -1, i64::MAX, i64::MIN]),
        nanos: i.pick(&[0, 1, 999_999_999, 1_000_000_000, -1, i32::MAX]),
    })
}

fn leg(i: &mut Input) -> Option<pb::LegSpec> {
    i.bool().then(|| pb::LegSpec {
        rtp_address: string(i, ADDRS),
        rtcp_address: string(i, ADDRS),
        strict: i.bool(),
        relay_address: string(i, ADDRS),
    })
}

fn latching(i: &mut Input) -> Option<pb::LatchingPolicy> {
    i.bool().then(|| pb::LatchingPolicy {
        mode: i.pick(&[0, 1, 2, 3, 4, 5, -1, i32::MAX]),
        packets: i.pick(&[0, 1, 5, u32::MAX]),
        duration: duration(i),
    })
}

fn enum_value(i: &mut Input) -> i32 {
    i.pick(&[0, 1, 2, 3, 4, 5, 6, -1, i32::MIN])
}

fn channel_ref(i: &mut Input) -> Option<pb::ChannelRef> {
    use pb::channel_ref::Target as T;
    i.bool().then(|| pb::ChannelRef {
        target: match i.below(3) {
            0 => None,
            1 => Some(T::Port(i.pick(&[
                0,
                1,
                30528,
                30529,
                65534,
                65536,
                u32::MAX,
            ]))),
            _ => Some(T::CallLeg(pb::CallLeg {
                call_id: string(i, &["", "c1"]),
                leg_tag: string(i, &["", "a"]),
            })),
        },
    })
}

fn allocate(r: &pb::AllocateRequest) {
    if let Some((_, spec)) = check(convert::allocate_from_pb(r), "allocate") {
        if let Err(e) = spec.validate() {
            check_field(&e.field, "allocate spec");
        }
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let which = i.below(5);
    if i.bool() {
        // Wire bytes.
        let bytes = i.rest();
        match which {
            0 => {
                if let Ok(r) = pb::AllocateRequest::decode(bytes) {
                    allocate(&r);
                }
            }
            1 => {
                if let Ok(r) = pb::UpdateRequest::decode(bytes) {
                    check(convert::update_from_pb(&r), "update");
                }
            }
            2 => {
                if let Ok(r) = pb::ListRequest::decode(bytes) {
                    check(convert::list_from_pb(&r), "list");
                }
            }
            3 => {
                if let Ok(r) = pb::WatchRequest::decode(bytes) {
                    check(convert::watch_kinds_from_pb(&r), "watch");
                }
            }
            _ => {
                if let Ok(r) = pb::ReleaseRequest::decode(bytes) {
                    check(convert::channel_ref_from_pb(r.channel.as_ref()), "release");
                }
            }
        }
        return;
    }
    // Field by field; also through the wire format, which must round-trip.
    match which {
        0 => {
            let r = pb::AllocateRequest {
                call_leg: i.bool().then(|| pb::CallLeg {
                    call_id: string(&mut i, &["", "c1", "x"]),
                    leg_tag: string(&mut i, &["", "a"]),
                }),
                kind: enum_value(&mut i),
                internet: [None, Some(true), Some(false)][i.below(3)],
                leg_a: leg(&mut i),
                leg_b: leg(&mut i),
                timeout: duration(&mut i),
                latching: latching(&mut i),
                clock_rate: i.pick(&[0, 8000, 1 << 20, (1 << 20) + 1, u32::MAX]),
                latch_any_payload: i.bool(),
                device: string(&mut i, &["", "4711"]),
            };
            assert_eq!(
                pb::AllocateRequest::decode(&*r.encode_to_vec()).ok(),
                Some(r.clone())
            );
            allocate(&r);
        }
        1 => {
            let r = pb::UpdateRequest {
                channel: channel_ref(&mut i),
                leg_a: leg(&mut i),
                leg_b: leg(&mut i),
                latching: latching(&mut i),
                timeout: duration(&mut i),
                clock_rate: i.bool().then(|| i.u32()),
            };
            check(convert::update_from_pb(&r), "update");
        }
        2 => {
            let r = pb::ListRequest {
                page_size: i.pick(&[0, 1, 1000, 1001, u32::MAX]),
                page_token: string(
                    &mut i,
                    &["", "p1.30528", "p1.", "p1.65536", "p2.1", "p1.-1"],
                ),
                kinds: (0..i.below(3)).map(|_| enum_value(&mut i)).collect(),
                states: (0..i.below(3)).map(|_| enum_value(&mut i)).collect(),
            };
            if let Some(q) = check(convert::list_from_pb(&r), "list") {
                assert!(q.limit >= 1 && q.limit <= convert::MAX_PAGE_SIZE as usize);
                // A token the server hands out reads back as the same position.
                let token = convert::page_token(q.after);
                let again = pb::ListRequest {
                    page_token: token,
                    ..r
                };
                assert_eq!(
                    check(convert::list_from_pb(&again), "list").map(|q2| q2.after),
                    Some(q.after)
                );
            }
        }
        3 => {
            let r = pb::WatchRequest {
                kinds: (0..i.below(4)).map(|_| enum_value(&mut i)).collect(),
            };
            check(convert::watch_kinds_from_pb(&r), "watch");
        }
        _ => {
            check(
                convert::channel_ref_from_pb(channel_ref(&mut i).as_ref()),
                "ref",
            );
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let alloc = pb::AllocateRequest {
        call_leg: Some(pb::CallLeg {
            call_id: "c1".into(),
            leg_tag: "a".into(),
        }),
        kind: 1,
        internet: Some(true),
        leg_a: Some(pb::LegSpec {
            rtp_address: "198.51.100.10:5004".into(),
            ..Default::default()
        }),
        leg_b: Some(pb::LegSpec {
            rtp_address: "192.0.2.10:6000".into(),
            strict: true,
            ..Default::default()
        }),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        latching: Some(pb::LatchingPolicy {
            mode: 1,
            packets: 3,
            duration: None,
        }),
        clock_rate: 8000,
        latch_any_payload: false,
        device: String::new(),
    };
    let mut wire = vec![0, 0, 1, 0];
    wire.extend(alloc.encode_to_vec());
    let list = pb::ListRequest {
        page_size: 10,
        page_token: "p1.30528".into(),
        kinds: vec![1, 2],
        states: vec![1],
    };
    let mut wire_list = vec![2, 0, 1, 0];
    wire_list.extend(list.encode_to_vec());
    vec![wire, wire_list, vec![0; 48], (0..=255).collect()]
}
