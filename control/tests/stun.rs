//! The STUN server against a real client: coturn's `turnutils_stunclient` (Debian package
//! `coturn`, installed by scripts/bootstrap.sh) on loopback, and `turnutils_natdiscovery`'s
//! RFC 5780 mapping and filtering discovery (CHANGE-REQUEST) against two loopback addresses
//! (127.0.0.1 and 127.0.0.2, both on `lo`).
//! Also RFC 5389 framing over TCP, with stun-rs as the client.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::SocketAddr;
use std::process::Command;

use control::config::StunSection;
use control::stun_server::StunServer;
use stun_rs::attributes::stun::XorMappedAddress;
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessageBuilder,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A port free on both 127.0.0.1 and 127.0.0.2, UDP and TCP (bound and released).
fn free_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if port >= 65_000 {
            continue;
        }
        let ok = std::net::UdpSocket::bind(("127.0.0.2", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port + 1)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.2", port + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.2", port + 1)).is_ok();
        if ok {
            return port;
        }
    }
}

async fn start(section: StunSection) -> tokio::sync::oneshot::Sender<()> {
    let server = StunServer::bind(&section).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    tx
}

/// Runs turnutils_stunclient (bounded by `timeout`, so a silent server fails the test instead
/// of hanging it) and returns its output.
async fn stunclient(args: Vec<String>) -> String {
    run("turnutils_stunclient", args).await
}

async fn run(program: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("timeout")
            .arg("10")
            .arg(program)
            .args(&args)
            .output()
            .expect("turnutils_stunclient (Debian package coturn; scripts/bootstrap.sh)");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn turnutils_stunclient_gets_its_mapped_address() {
    let port = free_port();
    let _stop = start(StunSection {
        listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..StunSection::default()
    })
    .await;
    let out = stunclient(vec![
        "-p".into(),
        port.to_string(),
        "-L".into(),
        "127.0.0.1".into(),
        "127.0.0.1".into(),
    ])
    .await;
    // "0: : IPv4. UDP reflexive addr: 127.0.0.1:40592"
    let mapped = reflexive(&out);
    assert_eq!(mapped.ip().to_string(), "127.0.0.1", "{out}");
    assert_ne!(mapped.port(), port, "{out}");
}

/// The address after "reflexive addr: " in turnutils_stunclient's output.
fn reflexive(out: &str) -> SocketAddr {
    let at = out
        .find("reflexive addr: ")
        .unwrap_or_else(|| panic!("no mapped address in {out:?}"));
    let rest = &out[at + "reflexive addr: ".len()..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("{out:?}"))
}

#[tokio::test]
async fn turnutils_natdiscovery_finds_no_nat_on_loopback() {
    let port = free_port();
    let _stop = start(StunSection {
        listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        other_address: Some(format!("127.0.0.2:{}", port + 1).parse().unwrap()),
        ..StunSection::default()
    })
    .await;
    let out = run(
        "turnutils_natdiscovery",
        vec![
            "-m".into(),
            "-f".into(),
            "-p".into(),
            port.to_string(),
            "-L".into(),
            "127.0.0.1".into(),
            "127.0.0.1".into(),
        ],
    )
    .await;
    assert!(
        out.contains("No NAT! (Endpoint Independent Mapping)"),
        "{out}"
    );
    assert!(out.contains("Endpoint Independent Filtering"), "{out}");
    // The filtering test's CHANGE-REQUEST (change IP and port) was answered from the second
    // address.
    assert!(
        out.contains(&format!("Response origin: : 127.0.0.2:{}", port + 1)),
        "{out}"
    );
}

fn binding_request() -> Vec<u8> {
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).build();
    let mut buf = [0u8; 64];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
        .unwrap();
    buf[..n].to_vec()
}

fn mapped(response: &[u8]) -> SocketAddr {
    let ctx = DecoderContextBuilder::default().with_validation().build();
    let (msg, _) = MessageDecoderBuilder::default()
        .with_context(ctx)
        .build()
        .decode(response)
        .unwrap();
    assert_eq!(msg.class(), MessageClass::SuccessResponse);
    *msg.get::<XorMappedAddress>()
        .unwrap()
        .as_xor_mapped_address()
        .unwrap()
        .socket_address()
}

#[tokio::test]
async fn tcp_framing_answers_each_request_on_the_connection() {
    let port = free_port();
    let _stop = start(StunSection {
        listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..StunSection::default()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let local = stream.local_addr().unwrap();
    // Two requests in one write: the framing splits them.
    let (a, b) = (binding_request(), binding_request());
    stream
        .write_all(&[a.clone(), b.clone()].concat())
        .await
        .unwrap();
    for req in [a, b] {
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).await.unwrap();
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.unwrap();
        let response = [head.to_vec(), body].concat();
        assert_eq!(&response[8..20], &req[8..20], "transaction id");
        assert!(response.len() <= relay_core::stun::response_bound(req.len()));
        assert_eq!(mapped(&response), local);
    }
}

#[tokio::test]
async fn rfc3489_request_is_not_answered() {
    let port = free_port();
    let _stop = start(StunSection {
        listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..StunSection::default()
    })
    .await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    let mut classic = binding_request();
    classic[4..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    socket.send(&classic).await.unwrap();
    let modern = binding_request();
    socket.send(&modern).await.unwrap();
    // The first answer is the one to the RFC 5389 request: the classic one got none.
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).await.unwrap();
    assert_eq!(&buf[8..20], &modern[8..20]);
    assert_eq!(mapped(&buf[..n]), socket.local_addr().unwrap());
}

#[test]
fn stun_section_is_checked() {
    use control::config::Config;
    let ok = Config::from_toml(
        "[stun]\nlisten = \"127.0.0.1:3478\"\nother_address = \"127.0.0.2:3479\"\nrate_per_source = 5\n",
    )
    .unwrap();
    assert_eq!(ok.stun.rate().per_second, 5);
    assert!(
        Config::from_toml("").unwrap().stun.listen.is_none(),
        "off by default"
    );
    for bad in [
        "[stun]\nother_address = \"127.0.0.2:3479\"\n",
        "[stun]\nlisten = \"0.0.0.0:3478\"\nother_address = \"127.0.0.2:3479\"\n",
        "[stun]\nlisten = \"127.0.0.1:3478\"\nother_address = \"127.0.0.2:3478\"\n",
        "[stun]\nlisten = \"127.0.0.1:3478\"\nother_address = \"127.0.0.1:3479\"\n",
        "[stun]\nlisten = \"127.0.0.1:3478\"\nother_address = \"[::1]:3479\"\n",
        "[stun]\nrate_per_source = 0\n",
        "[stun]\nmax_sources = 0\n",
        "[stun]\nlisten_udp = \"127.0.0.1:3478\"\n",
    ] {
        let err = Config::from_toml(bad).unwrap_err().to_string();
        assert!(err.contains("stun"), "{bad:?}: {err}");
    }
}
