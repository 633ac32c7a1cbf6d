//! The one event bus: every watcher sees every channel's events in causal order (Allocated,
//! then Latched, then Released), however many channels change at once and however many
//! watchers listen. A user-space relay on loopback; relay ports 42600–42639, peers 436xx.
mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use common::{Setup, TestServer, within};
use control::service::{ChannelRef, Watcher};
use relay_core::allocator::{Kind, Request};
use relay_core::{ChannelSpec, EventKind, LegSpec};

const CALLS: u16 = 12;

async fn collect(mut w: Watcher, n: usize) -> Vec<(u64, EventKind)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let Ok(e) = tokio::time::timeout(common::WAIT, w.next()).await else {
            panic!("only {} of {n} events: {seen:?}", seen.len());
        };
        let e = e.expect("the stream is open").expect("no lag");
        seen.push((e.channel.info.id.0, e.kind));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_sees_allocated_then_latched_then_released() {
    let server = TestServer::start(Setup::new(42600, 42639)).await;
    let watchers = [
        server.service.watch(),
        server.service.watch(),
        server.service.watch(),
    ];
    let collectors: Vec<_> = watchers
        .into_iter()
        .map(|w| tokio::spawn(collect(w, usize::from(CALLS) * 3)))
        .collect();

    let calls = (0..CALLS).map(|i| {
        let service = server.service.clone();
        tokio::spawn(async move {
            let office: SocketAddr = (Ipv4Addr::LOCALHOST, 43600 + 2 * i).into();
            let spec = ChannelSpec {
                legs: [
                    LegSpec::default(),
                    LegSpec {
                        rtp: Some(office),
                        strict: true,
                        ..LegSpec::default()
                    },
                ],
                ..ChannelSpec::default()
            };
            let (view, _) = service
                .allocate(Request::new(format!("bus-{i}"), "t", Kind::SipDevice), spec)
                .await
                .expect("allocate");
            let port = view.port();
            // The home leg latches on its first packet, which is relayed to the office peer.
            let at = UdpSocket::bind(office).expect("bind office peer");
            at.set_read_timeout(Some(common::WAIT)).expect("timeout");
            let home = UdpSocket::bind((Ipv4Addr::LOCALHOST, 43601 + 2 * i)).expect("bind home");
            let relayed = tokio::task::spawn_blocking(move || {
                home.send_to(&common::rtp(1, 12), (Ipv4Addr::LOCALHOST, port))
                    .expect("send");
                let mut buf = [0u8; 64];
                at.recv_from(&mut buf).expect("relayed").0
            })
            .await
            .expect("join");
            assert_eq!(relayed, 12);
            service
                .release(ChannelRef::Port(port))
                .await
                .expect("release");
            view.info.id.0
        })
    });
    let mut ids = Vec::new();
    for c in calls {
        ids.push(within(c).await.expect("call"));
    }
    for c in collectors {
        let seen = within(c).await.expect("watcher");
        let mut by_id: BTreeMap<u64, Vec<EventKind>> = BTreeMap::new();
        for (id, kind) in seen {
            by_id.entry(id).or_default().push(kind);
        }
        assert_eq!(by_id.len(), ids.len(), "{by_id:?}");
        for id in &ids {
            assert_eq!(
                by_id.get(id).map(Vec::as_slice),
                Some(
                    &[
                        EventKind::Allocated,
                        EventKind::Latched,
                        EventKind::Released
                    ][..]
                ),
                "channel {id}"
            );
        }
    }
    server.stop().await;
}
