//! The XDP program's own cost per packet, measured with `BPF_PROG_TEST_RUN` (a million runs in
//! the kernel per sample, no traffic generator, no veth, no clock reads inside the program).
//!
//! Three frames bracket it: an ARP frame (the program's shortest path: parse the Ethernet
//! header, count, pass — the floor of the measurement itself), a UDP packet to a relay port
//! with no channel (parse, configuration, channel lookup miss), and a packet the program
//! forwards. The forwarded frame is chosen so the rewrite is idempotent — leg B's peer is the
//! address the frame was sent to, and leg B's relay address is the frame's source — so each of
//! the million runs sees the same input and takes the full forwarding path (channel lookup,
//! latch check, next-hop cache, rewrite, checksums, counters, `XDP_TX`).
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use relay_common::{Channel, Endpoint, Leg};
use relay_user::{
    DataPath,
    netns::{self, Host, Testbed, TestbedOptions},
    xdp::{XdpDataPath, XdpMode, XdpOptions},
};
use serde::Serialize;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// An address on the relay's home link that is not the relay's own (so the FIB forwards to
/// it); it gets a static neighbour entry.
const FAKE_PEER: &str = "198.51.100.77";

/// Mean nanoseconds per program run (medians over samples).
#[derive(Clone, Debug, Default, Serialize)]
pub struct XdpCost {
    /// Runs per sample and samples.
    pub repeat: u32,
    pub samples: usize,
    /// ARP frame: the measurement's floor.
    pub floor_ns: f64,
    /// UDP to a relay port without a channel: passed up.
    pub no_channel_ns: f64,
    /// A forwarded packet that is not RTP (`XDP_TX`; packet and byte counters only).
    pub forward_ns: f64,
    /// A forwarded RTP packet (`XDP_TX`): also the RFC 3550 quality update and the fine clock
    /// read for jitter. Each run repeats the same sequence number (a duplicate): the same work
    /// as an in-order packet.
    pub forward_rtp_ns: f64,
    /// `forward_ns - floor_ns`: what forwarding adds over the cheapest possible run.
    pub forward_over_floor_ns: f64,
    /// `forward_rtp_ns - forward_ns`: what the RTP quality statistics add.
    pub rtp_quality_ns: f64,
}

fn sa(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("address {s}"))
}

fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> anyhow::Result<Vec<u8>> {
    frame_with(src, dst, sport, dport, &[0u8; 172])
}

fn frame_with(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1])
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut f, payload)
        .context("building the frame")?;
    Ok(f)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures on a fresh testbed; needs root.
pub fn measure(repeat: u32, samples: usize) -> anyhow::Result<XdpCost> {
    let tb = Testbed::create(TestbedOptions { nat: false })?;
    let pin = format!("/sys/fs/bpf/homerelay-bench-cost-{}", std::process::id());
    let pin_dir = std::path::PathBuf::from(&pin);
    let ifindex = tb.ifindex(Host::Relay, netns::RELAY_IF_HOME)?;
    let result = tb.run_in(Host::Relay, move || -> anyhow::Result<XdpCost> {
        let xdp = XdpDataPath::load(
            &XdpOptions {
                interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
                mode: XdpMode::Generic,
                pin_dir: Some(pin_dir),
            },
            30528,
            30887,
        )?;
        let out = std::process::Command::new("ip")
            .args(["neigh", "replace", FAKE_PEER, "lladdr", "02:00:00:00:01:02"])
            .args(["dev", netns::RELAY_IF_HOME, "nud", "permanent"])
            .output()?;
        if !out.status.success() {
            bail!("ip neigh: {}", String::from_utf8_lossy(&out.stderr));
        }
        let ep = |s: &str| -> anyhow::Result<Endpoint> { Ok(Endpoint::new(sa(s)?, true)) };
        let channel = Channel {
            legs: [
                Leg::new(
                    sa("198.51.100.77:30540")?,
                    ep("198.51.100.10:5004")?,
                    ep("198.51.100.10:5005")?,
                ),
                Leg::new(
                    sa("198.51.100.10:5004")?,
                    ep("198.51.100.77:30540")?,
                    ep("198.51.100.77:30541")?,
                ),
            ],
            flags: 0,
            ..Channel::default()
        };
        // The measured channel sends from 198.51.100.10, so that the rewritten frame equals the
        // input (the repeated runs need that); next hops are looked up from the sending
        // address, which must therefore be one of this namespace's own.
        let out = std::process::Command::new("ip")
            .args(["addr", "replace", "198.51.100.10/32", "dev", "lo"])
            .output()?;
        if !out.status.success() {
            bail!("ip addr: {}", String::from_utf8_lossy(&out.stderr));
        }
        xdp.install(30540, &channel)?;
        // Next hops come from user space (rtnetlink); resolve them before measuring (only
        // the measured direction, 198.51.100.10 → FAKE_PEER, can be).
        xdp.refresh_next_hops();
        let forward = frame([198, 51, 100, 10], [198, 51, 100, 77], 5004, 30540)?;
        // RTP version 2, PCMU, seq 7, timestamp 1120, 160 bytes of audio.
        let mut rtp = vec![0x80, 0, 0, 7, 0, 0, 0x04, 0x60, 0, 0, 0x11, 0x11];
        rtp.resize(172, 0xd5);
        let forward_rtp = frame_with([198, 51, 100, 10], [198, 51, 100, 77], 5004, 30540, &rtp)?;
        let no_channel = frame([198, 51, 100, 10], [198, 51, 100, 1], 5004, 30600)?;
        let mut arp = forward.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);

        let run = |f: &[u8], want: u32| -> anyhow::Result<f64> {
            let mut v = Vec::new();
            for _ in 0..samples {
                let (action, out, mean) = xdp.test_run_repeat(f, ifindex, repeat)?;
                if action != want {
                    bail!("program returned {action}, expected {want}");
                }
                if want == XDP_TX && out[14..] != f[14..] {
                    bail!("the forwarding frame is not idempotent: the measurement would be wrong");
                }
                v.push(mean.as_nanos() as f64);
            }
            Ok(median(v))
        };
        let floor_ns = run(&arp, XDP_PASS)?;
        let no_channel_ns = run(&no_channel, XDP_PASS)?;
        let forward_ns = run(&forward, XDP_TX)?;
        let forward_rtp_ns = run(&forward_rtp, XDP_TX)?;
        xdp.unpin_and_close()?;
        Ok(XdpCost {
            repeat,
            samples,
            floor_ns,
            no_channel_ns,
            forward_ns,
            forward_over_floor_ns: forward_ns - floor_ns,
            forward_rtp_ns,
            rtp_quality_ns: forward_rtp_ns - forward_ns,
        })
    });
    let _ = std::fs::remove_dir_all(&pin);
    result
}
