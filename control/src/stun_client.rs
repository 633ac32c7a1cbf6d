//! The STUN client's sockets: one Binding transaction over UDP with RFC 8489 retransmissions
//! (section 6.2.1). What a request and a response hold is `relay_core::stun::client`'s; this
//! module sends, waits and retransmits.
//!
//! A response is accepted from any source address as long as it answers the transaction (its
//! transaction id matches, FINGERPRINT is right): RFC 5780 behaviour discovery asks the server
//! to answer from another address. The transaction id is 96 random bits, new per transaction.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_core::stun::client::{BindingResponse, Change, ResponseError, parse_response};
use tokio::net::UdpSocket;

/// STUN's default port (RFC 8489).
pub const DEFAULT_PORT: u16 = 3478;

/// When to send again: `attempts` requests in all, the first wait `rto`, doubled after each
/// request, and the last request waited on for `last_wait_factor` × `rto` (RFC 8489: Rc = 7,
/// Rm = 16, RTO ≥ 500 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    pub rto: Duration,
    pub attempts: u32,
    pub last_wait_factor: u32,
}

impl Default for Retransmit {
    /// RFC 8489's schedule: 7 requests at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s, given up at
    /// 39.5 s.
    fn default() -> Self {
        Retransmit {
            rto: Duration::from_millis(500),
            attempts: 7,
            last_wait_factor: 16,
        }
    }
}

impl Retransmit {
    /// A short schedule for interactive checks (`doctor`, NAT-type detection): 4 requests at
    /// 0, 0.25, 0.75, 1.75 s, given up at 2.75 s. A filtering test whose answer the NAT drops
    /// waits this long.
    pub const QUICK: Retransmit = Retransmit {
        rto: Duration::from_millis(250),
        attempts: 4,
        last_wait_factor: 4,
    };

    /// The wait after request `n` (0-based).
    pub fn wait_after(&self, n: u32) -> Duration {
        if n + 1 >= self.attempts {
            self.rto * self.last_wait_factor
        } else {
            self.rto * (1u32 << n.min(16))
        }
    }

    /// How long a transaction takes at most.
    pub fn total(&self) -> Duration {
        (0..self.attempts).map(|n| self.wait_after(n)).sum()
    }
}

/// A Binding transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub response: BindingResponse,
    /// The address the response came from.
    pub from: SocketAddr,
    /// From the first request to the response.
    pub elapsed: Duration,
}

/// Why a transaction gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum StunClientError {
    #[error("no answer from STUN server {server} after {attempts} requests over {waited:?}")]
    Timeout {
        server: SocketAddr,
        attempts: u32,
        waited: Duration,
    },
    #[error("STUN server {server}: {error}")]
    Response {
        server: SocketAddr,
        error: ResponseError,
    },
    #[error("STUN request to {server}: {error}")]
    Io {
        server: SocketAddr,
        error: std::io::Error,
    },
}

impl StunClientError {
    /// True when the server did not answer at all (as opposed to answering with an error).
    pub fn is_timeout(&self) -> bool {
        matches!(self, StunClientError::Timeout { .. })
    }
}

/// One Binding transaction from `socket` to `server`. Datagrams that do not answer it (other
/// transactions, garbage) are ignored.
pub async fn binding(
    socket: &UdpSocket,
    server: SocketAddr,
    change: Change,
    retransmit: Retransmit,
) -> Result<Answer, StunClientError> {
    let txid: [u8; 12] = rand::random();
    let request = relay_core::stun::client::binding_request(txid, change);
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    for n in 0..retransmit.attempts.max(1) {
        socket
            .send_to(&request, server)
            .await
            .map_err(|error| StunClientError::Io { server, error })?;
        let deadline = tokio::time::Instant::now() + retransmit.wait_after(n);
        loop {
            let received = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
            let (len, from) = match received {
                Err(_elapsed) => break,
                Ok(Ok(r)) => r,
                // An ICMP error from an earlier datagram (port unreachable) surfaces here on
                // Linux; the next request may still be answered.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Ok(Err(error)) => return Err(StunClientError::Io { server, error }),
            };
            match parse_response(&buf[..len], txid) {
                Ok(response) => {
                    return Ok(Answer {
                        response,
                        from,
                        elapsed: start.elapsed(),
                    });
                }
                Err(error) if error.is_final() => {
                    return Err(StunClientError::Response { server, error });
                }
                Err(_) => continue,
            }
        }
    }
    Err(StunClientError::Timeout {
        server,
        attempts: retransmit.attempts.max(1),
        waited: start.elapsed(),
    })
}

/// Resolves a STUN server given as `host`, `host:port`, `IP` or `IP:port` (port 3478 when
/// absent), for the address family of `family_of` when given. Called before every use so a
/// dynamic-DNS name follows its changes.
pub async fn resolve(
    name: &str,
    family_of: Option<SocketAddr>,
) -> Result<SocketAddr, std::io::Error> {
    let with_port = if name.parse::<SocketAddr>().is_ok() {
        name.to_string()
    } else if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        SocketAddr::new(ip, DEFAULT_PORT).to_string()
    } else if name
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !h.contains(':') && p.parse::<u16>().is_ok())
    {
        name.to_string()
    } else {
        format!("{name}:{DEFAULT_PORT}")
    };
    let mut addrs = tokio::net::lookup_host(with_port.as_str()).await?;
    addrs
        .find(|a| family_of.is_none_or(|f| f.is_ipv4() == a.is_ipv4()))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} has no address of the wanted family"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8489_schedule() {
        let r = Retransmit::default();
        let waits: Vec<u64> = (0..7).map(|n| r.wait_after(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 8000]);
        assert_eq!(r.total(), Duration::from_millis(39_500));
        assert_eq!(Retransmit::QUICK.total(), Duration::from_millis(2_750));
    }

    #[tokio::test]
    async fn resolves_names_with_and_without_port() {
        assert_eq!(
            resolve("127.0.0.1", None).await.unwrap(),
            "127.0.0.1:3478".parse().unwrap()
        );
        assert_eq!(
            resolve("127.0.0.1:19302", None).await.unwrap(),
            "127.0.0.1:19302".parse().unwrap()
        );
        assert_eq!(
            resolve("::1", None).await.unwrap(),
            "[::1]:3478".parse().unwrap()
        );
        let v4 = resolve("localhost:5000", Some("192.0.2.1:1".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(v4, "127.0.0.1:5000".parse().unwrap());
        assert!(resolve("", None).await.is_err());
    }

    #[tokio::test]
    async fn a_transaction_against_our_server_and_a_silent_one() {
        // Our own server's core answering on loopback.
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            // Ignore the first request (a lost datagram), answer the second.
            let (_, _) = server.recv_from(&mut buf).await.unwrap();
            let (n, src) = server.recv_from(&mut buf).await.unwrap();
            let addresses = relay_core::stun::Addresses {
                primary: server_addr,
                other: None,
            };
            if let relay_core::stun::Decision::Respond { bytes, .. } = relay_core::stun::answer(
                &buf[..n],
                src,
                server_addr,
                addresses,
                relay_core::stun::Transport::Udp,
            ) {
                // Garbage first: must be ignored.
                server.send_to(b"not stun", src).await.unwrap();
                server.send_to(&bytes, src).await.unwrap();
            }
        });
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let fast = Retransmit {
            rto: Duration::from_millis(50),
            attempts: 4,
            last_wait_factor: 4,
        };
        let a = binding(&client, server_addr, Change::NONE, fast)
            .await
            .unwrap();
        assert_eq!(a.response.mapped, client.local_addr().unwrap());
        assert_eq!(a.from, server_addr);
        serve.await.unwrap();

        // Nobody answers: a timeout after every attempt.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = binding(&client, silent.local_addr().unwrap(), Change::NONE, fast)
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let mut buf = [0u8; 100];
        let mut seen = 0;
        while let Ok((n, _)) = silent.try_recv_from(&mut buf) {
            assert!(n >= 20);
            seen += 1;
        }
        assert_eq!(seen, 4, "every attempt sent one request");
    }
}
