//! A throw-away NAT lab: a host behind a NAT router of a chosen behaviour (RFC 4787 mapping and
//! filtering), and an Internet host with two addresses (an RFC 5780 STUN server's place).
//!
//! ```text
//!  Inside 203.0.113.10/24 (in0) ── (lan0) 203.0.113.1/24  Router  198.51.100.1/24 (wan0) ── (out0) 198.51.100.10/24  Outside
//!                                                                 198.51.100.2/24                  198.51.100.11/24
//! ```
//!
//! The invariant a reader must know: **everything a [`NatLab`] creates lives in three
//! namespaces named `hrnat-<pid>-<n>-{inside,router,outside}`, and dropping the lab deletes
//! them** (the veths and the nftables state go with them). Creation is all-or-nothing.
//! Namespaces of a process that died without unwinding are deleted by the next
//! [`NatLab::create`] that finds that pid gone.
//!
//! The router (`ip_forward=1`) source-translates UDP and TCP leaving `wan0` to
//! [`PUBLIC_ADDR`] (or [`PUBLIC_ADDR_2`], [`NatLab::set_public_address`]); Outside has no route
//! to the inside network, as on the Internet. What each [`NatKind`] adds:
//!
//! - Mapping. Linux conntrack NAT keeps the inside source port when the translated tuple is
//!   unused, so an inside socket keeps one public port towards every destination:
//!   endpoint-independent mapping. [`NatKind::Symmetric`] asks for `fully-random` ports, so
//!   every new destination (address or port) gets a new public port.
//! - Filtering. Conntrack alone lets in only replies from the exact address and port a
//!   mapping was opened to (address-and-port-dependent filtering). For the other two kinds,
//!   every UDP datagram that leaves `wan0` records, after translation, its mapping (public
//!   address and port → inside address and port) and the remote address it went to, in
//!   nftables sets (kept 10 minutes after the last packet). An unsolicited UDP datagram
//!   arriving at a recorded mapping is then forwarded to the inside socket (DNAT): from
//!   anywhere for [`NatKind::EndpointIndependent`], from a contacted address (any port) for
//!   [`NatKind::AddressDependent`]. Everything else that is new and addressed to the router
//!   itself on `wan0` is dropped before conntrack confirms it, as a router's firewall would:
//!   a dropped datagram leaves no conntrack entry whose tuple could disturb later mappings.
//!
//! Interfaces keep their default offloads (no XDP here) and resolve neighbours by ARP.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, bail};

use crate::netns::{enter, open_named, remove_stale_namespaces_of, run};

/// The host behind the NAT.
pub const INSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's LAN address, Inside's default gateway.
pub const ROUTER_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The router's WAN address the NAT translates to after [`NatLab::create`].
pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A second WAN address, also on the router, that the NAT can switch to (a dynamic public IP
/// that changes, [`NatLab::set_public_address`]).
pub const PUBLIC_ADDR_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Outside's first address (an RFC 5780 STUN server's primary address).
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Outside's second address (the STUN server's OTHER-ADDRESS).
pub const SERVER_ADDR_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);

/// Inside's interface.
pub const INSIDE_IF: &str = "in0";
/// The router's interface towards Inside.
pub const ROUTER_LAN_IF: &str = "lan0";
/// The router's interface towards Outside; translation happens on it.
pub const ROUTER_WAN_IF: &str = "wan0";
/// Outside's interface.
pub const OUTSIDE_IF: &str = "out0";

/// Prefix length of both subnets.
const PREFIX_LEN: u8 = 24;
/// The router's nftables table.
const TABLE: &str = "natlab";
/// Namespace name prefix (`hrnat-<pid>-<n>-<node>`).
const NS_PREFIX: &str = "hrnat-";

/// The NAT's behaviour (RFC 4787 terms; the classic names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering ("full cone").
    EndpointIndependent,
    /// Endpoint-independent mapping, address-dependent filtering ("restricted cone").
    AddressDependent,
    /// Address-and-port-dependent mapping (`fully-random` ports) and filtering ("symmetric").
    Symmetric,
}

impl NatKind {
    /// Every kind.
    pub const ALL: [NatKind; 3] = [
        NatKind::EndpointIndependent,
        NatKind::AddressDependent,
        NatKind::Symmetric,
    ];

    /// A short lowercase name (for test output and thread names).
    pub fn name(self) -> &'static str {
        match self {
            NatKind::EndpointIndependent => "endpoint-independent",
            NatKind::AddressDependent => "address-dependent",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// A machine of the lab, each in its own network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The host behind the NAT ([`INSIDE_ADDR`]).
    Inside,
    /// The NAT router.
    Router,
    /// The Internet host with [`SERVER_ADDR`] and [`SERVER_ADDR_2`].
    Outside,
}

impl Node {
    const ALL: [Node; 3] = [Node::Inside, Node::Router, Node::Outside];

    fn suffix(self) -> &'static str {
        match self {
            Node::Inside => "inside",
            Node::Router => "router",
            Node::Outside => "outside",
        }
    }
}

/// Three namespaces wired as described in the module documentation. Dropping it deletes them.
#[derive(Debug)]
pub struct NatLab {
    kind: NatKind,
    prefix: String,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created: Vec<(Node, String)>,
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

impl NatLab {
    /// Builds the lab with a NAT of `kind`, translating to [`PUBLIC_ADDR`]. Needs root
    /// (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` and `nft`.
    pub fn create(kind: NatKind) -> anyhow::Result<NatLab> {
        let suffixes: Vec<&str> = Node::ALL.iter().map(|n| n.suffix()).collect();
        remove_stale_namespaces_of(NS_PREFIX, &suffixes);
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let mut lab = NatLab {
            kind,
            prefix: format!("{NS_PREFIX}{}-{n}-", std::process::id()),
            created: Vec::new(),
        };
        // On error `lab` is dropped here, deleting whatever was created.
        lab.build()
            .with_context(|| format!("creating NAT lab {} ({})", lab.prefix, kind.name()))?;
        Ok(lab)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        for node in Node::ALL {
            let name = format!("{}{}", self.prefix, node.suffix());
            run(&["ip", "netns", "add", &name], None)?;
            self.created.push((node, name));
            self.ip(node, &["link", "set", "lo", "up"])?;
        }
        self.veth(Node::Inside, INSIDE_IF, Node::Router, ROUTER_LAN_IF)?;
        self.veth(Node::Router, ROUTER_WAN_IF, Node::Outside, OUTSIDE_IF)?;
        let addresses: [(Node, &str, Ipv4Addr); 6] = [
            (Node::Inside, INSIDE_IF, INSIDE_ADDR),
            (Node::Router, ROUTER_LAN_IF, ROUTER_LAN_ADDR),
            (Node::Router, ROUTER_WAN_IF, PUBLIC_ADDR),
            (Node::Router, ROUTER_WAN_IF, PUBLIC_ADDR_2),
            (Node::Outside, OUTSIDE_IF, SERVER_ADDR),
            (Node::Outside, OUTSIDE_IF, SERVER_ADDR_2),
        ];
        for (node, iface, addr) in addresses {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            self.ip(node, &["addr", "add", &cidr, "dev", iface])?;
        }
        for (node, iface) in [
            (Node::Inside, INSIDE_IF),
            (Node::Router, ROUTER_LAN_IF),
            (Node::Router, ROUTER_WAN_IF),
            (Node::Outside, OUTSIDE_IF),
        ] {
            self.ip(node, &["link", "set", iface, "up"])?;
        }
        self.ip(
            Node::Inside,
            &[
                "route",
                "add",
                "default",
                "via",
                &ROUTER_LAN_ADDR.to_string(),
            ],
        )?;
        for node in Node::ALL {
            let mut argv = vec![
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ];
            if node == Node::Router {
                argv.push("net.ipv4.ip_forward=1");
            }
            self.exec(node, &argv)?;
        }
        let rules = ruleset(self.kind, PUBLIC_ADDR);
        run(
            &[
                "ip",
                "netns",
                "exec",
                self.ns(Node::Router),
                "nft",
                "-f",
                "-",
            ],
            Some(rules.as_bytes()),
        )
        .context("installing the NAT rules")?;
        Ok(())
    }

    /// A veth pair from `a`'s `a_if` to `b`'s `b_if`.
    fn veth(&self, a: Node, a_if: &str, b: Node, b_if: &str) -> anyhow::Result<()> {
        let b_ns = self.ns(b).to_owned();
        self.ip(
            a,
            &[
                "link", "add", "name", a_if, "type", "veth", "peer", "name", b_if, "netns", &b_ns,
            ],
        )
        .map(|_| ())
    }

    /// The NAT's behaviour.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// The namespace name of `node` (for `ip netns exec`).
    pub fn ns(&self, node: Node) -> &str {
        match self.created.iter().find(|(n, _)| *n == node) {
            Some((_, name)) => name,
            // Unreachable after `create`: all three namespaces exist or creation failed.
            None => "",
        }
    }

    /// Runs `f` on a new thread that has entered `node`'s network namespace and returns its
    /// result. Sockets `f` creates (tokio's too: a runtime built inside `f` runs its workers
    /// in the namespace) belong to that namespace for their whole life. A panic in `f` is
    /// propagated.
    pub fn run_in<R: Send + 'static>(
        &self,
        node: Node,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let handle = self.spawn_in(node, f)?;
        match handle.join() {
            Ok(r) => Ok(r),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Spawns a thread in `node`'s namespace (servers, long-running peers). Returns once the
    /// thread is in the namespace; failing to enter it is an error here, not a panic later.
    pub fn spawn_in<R: Send + 'static>(
        &self,
        node: Node,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<JoinHandle<R>> {
        let ns = open_named(self.ns(node))?;
        let (entered_tx, entered_rx) = mpsc::sync_channel::<anyhow::Result<()>>(1);
        let handle = std::thread::Builder::new()
            .name(format!("natlab-{}", node.suffix()))
            .spawn(move || {
                let entered = enter(&ns);
                let ok = entered.is_ok();
                // The receiver waits for this message; it is gone only if `spawn_in` itself
                // was unwound, and then nobody needs the answer.
                let _ = entered_tx.send(entered);
                if !ok {
                    // Never run `f` outside the namespace. The thread's result is unused:
                    // `spawn_in` returned the error instead of the handle.
                    panic!("not in the namespace of {node:?}");
                }
                f()
            })
            .context("spawning a thread")?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e.context(format!("entering the namespace of {node:?}")))
            }
            Err(_) => bail!("the thread for {node:?} ended before entering its namespace"),
        }
    }

    /// Runs a command inside `node`'s namespace (`ip netns exec`) and returns its stdout; a
    /// failure carries the command and its stderr.
    pub fn exec(&self, node: Node, argv: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.ns(node)];
        full.extend_from_slice(argv);
        run(&full, None)
    }

    /// Makes the NAT translate to `addr` ([`PUBLIC_ADDR`] or [`PUBLIC_ADDR_2`]; both stay on
    /// the router's WAN interface) and flushes every existing mapping — the conntrack table
    /// (`conntrack -F`, package `conntrack`) and the filtering sets — so the next packet of any
    /// flow leaves from `addr`, as after a dynamic public address changed.
    pub fn set_public_address(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        if addr != PUBLIC_ADDR && addr != PUBLIC_ADDR_2 {
            bail!(
                "{addr} is not a public address of the NAT lab ({PUBLIC_ADDR} or {PUBLIC_ADDR_2})"
            );
        }
        let update = format!(
            "flush chain ip {TABLE} postrouting\n\
             add rule ip {TABLE} postrouting {}\n\
             flush map ip {TABLE} back\n\
             flush set ip {TABLE} peers\n",
            snat_rule(self.kind, addr)
        );
        run(
            &[
                "ip",
                "netns",
                "exec",
                self.ns(Node::Router),
                "nft",
                "-f",
                "-",
            ],
            Some(update.as_bytes()),
        )
        .context("switching the NAT's public address")?;
        self.exec(Node::Router, &["conntrack", "-F"]).context(
            "flushing the NAT's conntrack table (the `conntrack` tool is installed by \
             scripts/bootstrap.sh)",
        )?;
        Ok(())
    }

    fn ip(&self, node: Node, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "-n", self.ns(node)];
        full.extend_from_slice(args);
        run(&full, None)
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for (_, name) in self.created.drain(..).rev() {
            if let Err(e) = run(&["ip", "netns", "del", &name], None) {
                log::warn!("NAT lab cleanup: {e:#}");
            }
        }
    }
}

/// The source translation rule of the postrouting chain.
fn snat_rule(kind: NatKind, public: Ipv4Addr) -> String {
    let random = match kind {
        NatKind::Symmetric => " fully-random",
        NatKind::EndpointIndependent | NatKind::AddressDependent => "",
    };
    format!("oifname \"{ROUTER_WAN_IF}\" snat ip to {public}{random}")
}

/// The router's whole nftables table for `kind`, translating to `public`.
fn ruleset(kind: NatKind, public: Ipv4Addr) -> String {
    // `back`: public address . port → inside address . port, for every mapping used outbound.
    // `peers`: remote address . public address . port, for every remote a mapping sent to.
    // A reply-direction packet leaving wan0 belongs to a flow let in by `inbound`, whose
    // reply tuple starts at the inside socket.
    let record = format!(
        "\tchain record {{\n\
         \t\ttype filter hook postrouting priority srcnat + 10; policy accept;\n\
         \t\toifname \"{ROUTER_WAN_IF}\" meta l4proto udp ct direction original update @back {{ ip saddr . udp sport : ct original ip saddr . ct original proto-src }}\n\
         \t\toifname \"{ROUTER_WAN_IF}\" meta l4proto udp ct direction reply update @back {{ ip saddr . udp sport : ct reply ip saddr . ct reply proto-src }}\n\
         \t\toifname \"{ROUTER_WAN_IF}\" meta l4proto udp update @peers {{ ip daddr . ip saddr . udp sport }}\n\
         \t}}\n"
    );
    let allowed = match kind {
        NatKind::EndpointIndependent => Some(String::new()),
        NatKind::AddressDependent => Some("ip saddr . ip daddr . udp dport @peers ".to_owned()),
        NatKind::Symmetric => None,
    };
    let (record, inbound) = match allowed {
        Some(cond) => (
            record,
            format!(
                "\tchain inbound {{\n\
                 \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                 \t\tiifname \"{ROUTER_WAN_IF}\" meta l4proto udp {cond}dnat ip to ip daddr . udp dport map @back\n\
                 \t}}\n"
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "table ip {TABLE} {{\n\
         \tmap back {{\n\
         \t\ttype ipv4_addr . inet_service : ipv4_addr . inet_service\n\
         \t\tflags dynamic, timeout; timeout 10m;\n\
         \t}}\n\
         \tset peers {{\n\
         \t\ttype ipv4_addr . ipv4_addr . inet_service\n\
         \t\tflags dynamic, timeout; timeout 10m;\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\t{}\n\
         \t}}\n\
         {record}\
         {inbound}\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{ROUTER_WAN_IF}\" ct state new drop\n\
         \t}}\n\
         }}\n",
        snat_rule(kind, public)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_test_nets_and_distinct() {
        let all = [
            INSIDE_ADDR,
            ROUTER_LAN_ADDR,
            PUBLIC_ADDR,
            PUBLIC_ADDR_2,
            SERVER_ADDR,
            SERVER_ADDR_2,
        ];
        for (i, a) in all.iter().enumerate() {
            let o = a.octets();
            assert!(
                matches!(o[..3], [192, 0, 2] | [198, 51, 100] | [203, 0, 113]),
                "{a} is not a TEST-NET address"
            );
            assert!(!all[i + 1..].contains(a), "{a} twice");
        }
    }

    #[test]
    fn rules_differ_by_kind() {
        let eif = ruleset(NatKind::EndpointIndependent, PUBLIC_ADDR);
        assert!(eif.contains("udp dnat ip to"), "{eif}");
        assert!(!eif.contains("fully-random"));
        let adf = ruleset(NatKind::AddressDependent, PUBLIC_ADDR);
        assert!(adf.contains("@peers dnat"), "{adf}");
        let sym = ruleset(NatKind::Symmetric, PUBLIC_ADDR_2);
        assert!(
            sym.contains("snat ip to 198.51.100.2 fully-random"),
            "{sym}"
        );
        assert!(!sym.contains("dnat"), "{sym}");
    }
}
