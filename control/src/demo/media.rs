//! The demo's two phones per call: real UDP sockets (each created inside its host's network
//! namespace) sending 20 ms G.711 RTP packets to the relay and counting what comes back.
//!
//! Invariant: a receiver counts a packet only if it comes from the relay's channel address and
//! carries the other phone's SSRC; each sequence number is counted once, so `sent - received`
//! is the loss. Everything else is counted as foreign, never as received.
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One packet every 20 ms (50 packets/s), as phones send G.711.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// G.711 payload of 20 ms at 8 kHz: 160 one-byte samples.
const PAYLOAD_LEN: usize = 160;
/// RTP header (RFC 3550 section 5.1, no CSRC, no extension) and payload.
pub const PACKET_LEN: usize = 12 + PAYLOAD_LEN;
/// RTP payload type 0: PCMU (RFC 3551 section 6).
const PT_PCMU: u8 = 0;
/// μ-law silence.
const MULAW_SILENCE: u8 = 0xff;

/// An RTP packet of 20 ms of μ-law silence.
pub fn rtp_packet(seq: u16, ssrc: u32) -> [u8; PACKET_LEN] {
    let mut p = [MULAW_SILENCE; PACKET_LEN];
    p[0] = 0x80; // version 2, no padding, no extension, no CSRC
    p[1] = PT_PCMU;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    // The timestamp advances by the samples of one packet (8 kHz clock).
    let ts = u32::from(seq).wrapping_mul(PAYLOAD_LEN as u32);
    p[4..8].copy_from_slice(&ts.to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

/// The SSRC and sequence number of an RTP packet, if it looks like one.
fn parse_rtp(p: &[u8]) -> Option<(u32, u16)> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    let seq = u16::from_be_bytes([p[2], p[3]]);
    let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
    Some((ssrc, seq))
}

/// What one receiver counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Distinct packets of the expected stream from the expected source.
    pub packets: u64,
    /// Packets of the expected stream seen again.
    pub duplicates: u64,
    /// Anything else: another source, another SSRC, not RTP.
    pub foreign: u64,
}

/// One direction of one call: who sends, where to, who receives and from where.
#[derive(Debug)]
pub struct Direction {
    pub from: UdpSocket,
    /// The relay's channel address the sender talks to.
    pub to: SocketAddr,
    pub at: UdpSocket,
    /// The relay's channel address the receiver must see as the source.
    pub expect_from: SocketAddr,
    pub ssrc: u32,
}

/// The running phones of every call. Dropping it stops and joins every thread.
#[derive(Debug, Default)]
pub struct Media {
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    senders: Vec<(Arc<AtomicU64>, JoinHandle<()>)>,
    receivers: Vec<JoinHandle<Received>>,
}

/// Per direction, in the order the directions were started: packets sent and what arrived.
pub type Counts = Vec<(u64, Received)>;

impl Media {
    /// Starts a sender and a receiver for `dir`. With `after`, the sender waits until that
    /// flag is set (the answering phone waits until it hears the other one); the receiver sets
    /// `heard` on its first packet.
    pub fn start(
        &mut self,
        dir: Direction,
        after: Option<Arc<AtomicBool>>,
        heard: Option<Arc<AtomicBool>>,
    ) -> std::io::Result<()> {
        let Direction {
            from,
            to,
            at,
            expect_from,
            ssrc,
        } = dir;
        at.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::clone(&self.stop_receiving);
        let receiver = std::thread::Builder::new()
            .name("demo-rx".into())
            .spawn(move || receive(&at, expect_from, ssrc, &stop, heard.as_deref()))?;
        self.receivers.push(receiver);
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::clone(&self.stop_sending);
        let count = Arc::clone(&sent);
        let sender = std::thread::Builder::new()
            .name("demo-tx".into())
            .spawn(move || send(&from, to, ssrc, &stop, after.as_deref(), &count))?;
        self.senders.push((sent, sender));
        Ok(())
    }

    /// Stops the senders, gives packets in flight `drain` to arrive, stops the receivers.
    pub fn stop(&mut self, drain: Duration) -> Counts {
        self.stop_sending.store(true, Ordering::Relaxed);
        let sent: Vec<u64> = self
            .senders
            .drain(..)
            .map(|(count, handle)| {
                let _ = handle.join();
                count.load(Ordering::Relaxed)
            })
            .collect();
        std::thread::sleep(drain);
        self.stop_receiving.store(true, Ordering::Relaxed);
        let received: Vec<Received> = self
            .receivers
            .drain(..)
            .map(|h| h.join().unwrap_or_default())
            .collect();
        sent.into_iter().zip(received).collect()
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        if !self.senders.is_empty() || !self.receivers.is_empty() {
            self.stop(Duration::ZERO);
        }
    }
}

fn send(
    sock: &UdpSocket,
    to: SocketAddr,
    ssrc: u32,
    stop: &AtomicBool,
    after: Option<&AtomicBool>,
    sent: &AtomicU64,
) {
    if let Some(after) = after {
        while !after.load(Ordering::Relaxed) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let start = Instant::now();
    let mut send_errors = 0u64;
    for n in 0u32.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // An absolute schedule: a late wake-up does not delay the packets after it.
        if let Some(wait) = (start + PACKET_INTERVAL * n).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // The sequence number wraps after 65536 packets (21 minutes), as RTP's does.
        match sock.send_to(&rtp_packet(n as u16, ssrc), to) {
            Ok(_) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                send_errors += 1;
                if send_errors == 1 {
                    log::warn!("sending to {to}: {e}");
                }
            }
        }
    }
}

fn receive(
    sock: &UdpSocket,
    expect_from: SocketAddr,
    ssrc: u32,
    stop: &AtomicBool,
    heard: Option<&AtomicBool>,
) -> Received {
    let mut seen = vec![false; usize::from(u16::MAX) + 1];
    let mut counts = Received::default();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        match parse_rtp(&buf[..n]) {
            Some((s, seq)) if s == ssrc && from == expect_from && n == PACKET_LEN => {
                let slot = &mut seen[usize::from(seq)];
                if *slot {
                    counts.duplicates += 1;
                } else {
                    *slot = true;
                    counts.packets += 1;
                    if let Some(heard) = heard {
                        heard.store(true, Ordering::Relaxed);
                    }
                }
            }
            _ => counts.foreign += 1,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_g711_rtp() {
        let p = rtp_packet(3, 0x0102_0304);
        assert_eq!(p.len(), 172);
        assert_eq!(&p[..12], &[0x80, 0, 0, 3, 0, 0, 1, 0xe0, 1, 2, 3, 4]);
        assert!(p[12..].iter().all(|&b| b == 0xff));
        assert_eq!(parse_rtp(&p), Some((0x0102_0304, 3)));
        assert_eq!(parse_rtp(&p[..11]), None);
        assert_eq!(parse_rtp(&[0u8; 12]), None, "RTP version 0");
    }

    #[test]
    fn receivers_count_each_packet_once_and_only_from_the_relay() {
        let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let intruder = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let phone = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = phone.local_addr().expect("addr");
        let stranger_to = relay.local_addr().expect("addr");
        let mut media = Media::default();
        let heard = Arc::new(AtomicBool::new(false));
        // The phone receives from `relay`; its own sender's packets go nowhere that matters.
        media
            .start(
                Direction {
                    from: intruder.try_clone().expect("clone"),
                    to: stranger_to,
                    at: phone,
                    expect_from: relay.local_addr().expect("addr"),
                    ssrc: 7,
                },
                None,
                Some(Arc::clone(&heard)),
            )
            .expect("start");
        for seq in [0, 1, 1, 2] {
            relay.send_to(&rtp_packet(seq, 7), to).expect("send");
        }
        relay.send_to(&rtp_packet(3, 8), to).expect("send");
        intruder.send_to(&rtp_packet(4, 7), to).expect("send");
        while !heard.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let counts = media.stop(Duration::from_millis(200));
        let (_, received) = counts[0];
        assert_eq!(
            received,
            Received {
                packets: 3,
                duplicates: 1,
                foreign: 2
            }
        );
    }
}
