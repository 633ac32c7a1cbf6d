//! NAT behaviour discovery (RFC 5780 section 4), without I/O: which Binding requests to send
//! in which order, and what their answers say about the NAT's mapping (section 4.3) and
//! filtering (section 4.4), summarised as a classic NAT type.
//!
//! [`Discovery`] is the procedure: it names the next [`Probe`], the shell (`control::nat_detect`)
//! sends it from **one local socket** and records the [`Outcome`]; [`Discovery::finish`] gives
//! the [`Classification`]. The invariant a reader must know: **the filtering tests run before
//! the mapping tests.** RFC 5780 warns that the filtering tests "are sensitive to prior state
//! on the NAT": once the mapping tests have sent to the server's other address and port, an
//! address-dependent or address-and-port-dependent filter lets those answers in and looks
//! endpoint-independent. The order is:
//!
//! 1. test I: a Binding request to the server's primary address. Its XOR-MAPPED-ADDRESS is the
//!    public mapping; no OTHER-ADDRESS means the server cannot run this procedure;
//! 2. filtering test II: to the primary address with CHANGE-REQUEST change-IP and change-port.
//!    Answered (from the other IP and port): endpoint-independent filtering;
//! 3. filtering test III (if II was not answered): change-port only. Answered (from the primary
//!    IP, other port): address-dependent filtering, else address-and-port-dependent;
//! 4. if test I's mapping equals the local address: no NAT, no mapping tests;
//! 5. mapping test II: to the other IP and the primary port. Same mapping as test I:
//!    endpoint-independent mapping;
//! 6. mapping test III: to the other IP and port. Same mapping as mapping test II:
//!    address-dependent mapping, else address-and-port-dependent.
//!
//! A test that gets no answer says something only where the RFC says so (the filtering
//! tests); elsewhere it leaves the behaviour undetermined, and so does an answer from the
//! wrong source (a server that ignores CHANGE-REQUEST) or an error answer.

use std::net::SocketAddr;

use super::client::Change;

/// How the NAT maps an inside transport address to public ones (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// The mapped address is the local one: no NAT on the path.
    NoNat,
    /// One public address and port towards every destination.
    EndpointIndependent,
    /// A new mapping per destination IP address.
    AddressDependent,
    /// A new mapping per destination IP address and port.
    AddressAndPortDependent,
}

impl Mapping {
    /// The CLI and JSON word.
    pub fn name(self) -> &'static str {
        match self {
            Mapping::NoNat => "no-nat",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// Which unsolicited datagrams the NAT (or a firewall) lets in to a mapping (RFC 4787 section
/// 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filtering {
    /// From anywhere.
    EndpointIndependent,
    /// From any port of an address the mapping has sent to.
    AddressDependent,
    /// Only from the addresses and ports the mapping has sent to.
    AddressAndPortDependent,
}

impl Filtering {
    /// The CLI and JSON word.
    pub fn name(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// The summary in the classic (RFC 3489) words people and router manuals use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatType {
    /// No NAT and no filtering.
    OpenInternet,
    /// No NAT, but a firewall filters unsolicited datagrams.
    FilteringFirewall,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    RestrictedCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestrictedCone,
    /// A mapping that depends on the destination (address, or address and port).
    Symmetric,
    /// The tests could not tell.
    Unknown,
}

impl NatType {
    /// From the two behaviours: a destination-dependent mapping is symmetric whatever the
    /// filtering; otherwise both must be known.
    pub fn from_behaviour(mapping: Option<Mapping>, filtering: Option<Filtering>) -> NatType {
        match (mapping, filtering) {
            (Some(Mapping::AddressDependent | Mapping::AddressAndPortDependent), _) => {
                NatType::Symmetric
            }
            (Some(Mapping::NoNat), Some(Filtering::EndpointIndependent)) => NatType::OpenInternet,
            (
                Some(Mapping::NoNat),
                Some(Filtering::AddressDependent | Filtering::AddressAndPortDependent),
            ) => NatType::FilteringFirewall,
            (Some(Mapping::EndpointIndependent), Some(f)) => match f {
                Filtering::EndpointIndependent => NatType::FullCone,
                Filtering::AddressDependent => NatType::RestrictedCone,
                Filtering::AddressAndPortDependent => NatType::PortRestrictedCone,
            },
            (None, _) | (Some(Mapping::NoNat | Mapping::EndpointIndependent), None) => {
                NatType::Unknown
            }
        }
    }

    /// The CLI and JSON word.
    pub fn name(self) -> &'static str {
        match self {
            NatType::OpenInternet => "open-internet",
            NatType::FilteringFirewall => "filtering-firewall",
            NatType::FullCone => "full-cone",
            NatType::RestrictedCone => "restricted-cone",
            NatType::PortRestrictedCone => "port-restricted-cone",
            NatType::Symmetric => "symmetric",
            NatType::Unknown => "unknown",
        }
    }

    /// One line for people.
    pub fn describe(self) -> &'static str {
        match self {
            NatType::OpenInternet => "no NAT and no filtering: the local address is public",
            NatType::FilteringFirewall => {
                "no NAT; a firewall lets in only answers to what was sent"
            }
            NatType::FullCone => {
                "full cone NAT: one public port per local port, reachable from anywhere"
            }
            NatType::RestrictedCone => {
                "restricted cone NAT: one public port per local port, reachable from \
                 addresses it has sent to"
            }
            NatType::PortRestrictedCone => {
                "port-restricted cone NAT: one public port per local port, reachable from \
                 addresses and ports it has sent to"
            }
            NatType::Symmetric => {
                "symmetric NAT: a new public port for every destination, so the port a STUN \
                 server sees is not the one other peers see"
            }
            NatType::Unknown => "the tests could not tell the NAT's behaviour",
        }
    }

    /// Whether remote devices (and the relay's own public address) work behind a NAT of this
    /// type. A symmetric NAT does not: the address learnt by STUN is not the one the relay and
    /// the devices see. `Unknown` is not shown to work either.
    pub fn usable_for_remote_devices(self) -> bool {
        match self {
            NatType::OpenInternet
            | NatType::FilteringFirewall
            | NatType::FullCone
            | NatType::RestrictedCone
            | NatType::PortRestrictedCone => true,
            NatType::Symmetric | NatType::Unknown => false,
        }
    }
}

/// Why a result may be wrong when outbound traffic is restricted.
pub const RESTRICTED_OUTBOUND_CAVEAT: &str = "a firewall that restricts outbound UDP (here: to \
     the STUN server's second address and port) drops some of these tests, which makes a \
     router look symmetric or filtering when it is not; allow the forwarded ports outbound \
     too, and repeat the test from the relay host itself";
/// Why the result describes this moment only.
pub const CURRENT_BEHAVIOUR_CAVEAT: &str = "the result is the NAT's behaviour for UDP towards \
     this server now; a NAT can change its behaviour under load, after a restart or for other \
     protocols";

/// The tests of the procedure, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestId {
    /// Test I, shared by both sections: a plain Binding to the primary address.
    Binding,
    /// Section 4.4 test II: change IP and port.
    FilteringChangeIpAndPort,
    /// Section 4.4 test III: change port.
    FilteringChangePort,
    /// Section 4.3 test II: to the other IP, primary port.
    MappingOtherIp,
    /// Section 4.3 test III: to the other IP and port.
    MappingOtherIpAndPort,
}

impl TestId {
    /// The CLI and JSON word.
    pub fn name(self) -> &'static str {
        match self {
            TestId::Binding => "binding",
            TestId::FilteringChangeIpAndPort => "filtering-change-ip-and-port",
            TestId::FilteringChangePort => "filtering-change-port",
            TestId::MappingOtherIp => "mapping-other-ip",
            TestId::MappingOtherIpAndPort => "mapping-other-ip-and-port",
        }
    }
}

/// A Binding request to send: from the one local socket, to `to`, with `change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub test: TestId,
    pub to: SocketAddr,
    pub change: Change,
}

/// What a probe got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A success response.
    Answered {
        /// XOR-MAPPED-ADDRESS.
        mapped: SocketAddr,
        /// Where the datagram came from.
        from: SocketAddr,
        /// OTHER-ADDRESS, if given.
        other_address: Option<SocketAddr>,
    },
    /// No answer within the retransmission schedule.
    NoAnswer,
    /// An error response, or a local failure; the text says which.
    Failed(String),
}

/// Why the procedure cannot give a classification at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no answer from STUN server {server}")]
    NoAnswer { server: SocketAddr },
    #[error("STUN server {server}: {reason}")]
    Failed { server: SocketAddr, reason: String },
    #[error(
        "server {server} does not offer RFC 5780 behaviour discovery (its answer carries no \
         OTHER-ADDRESS)"
    )]
    NoOtherAddress { server: SocketAddr },
    #[error(
        "server {server} names OTHER-ADDRESS {other}, which must differ from it in both IP and \
         port (RFC 5780)"
    )]
    BadOtherAddress {
        server: SocketAddr,
        other: SocketAddr,
    },
    #[error("the discovery expected {expected:?}, not an outcome for {got:?}")]
    UnexpectedOutcome {
        expected: Option<TestId>,
        got: TestId,
    },
    #[error("the discovery is not finished: {next:?} is still to run")]
    Unfinished { next: TestId },
}

/// What the procedure found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The public mapping of the local socket towards the server (test I).
    pub public: SocketAddr,
    /// The server's OTHER-ADDRESS.
    pub other_address: SocketAddr,
    /// `None`: the tests could not tell (see `notes`).
    pub mapping: Option<Mapping>,
    /// `None`: the tests could not tell (see `notes`).
    pub filtering: Option<Filtering>,
    pub nat_type: NatType,
    /// Why a behaviour is undetermined, or anything odd an answer showed.
    pub notes: Vec<String>,
    /// Limits of the result worth telling (see [`RESTRICTED_OUTBOUND_CAVEAT`]).
    pub caveats: Vec<&'static str>,
}

/// The RFC 5780 procedure for one server, from one local socket.
#[derive(Debug, Clone)]
pub struct Discovery {
    server: SocketAddr,
    local: SocketAddr,
    log: Vec<(Probe, Outcome)>,
}

impl Discovery {
    /// `server`: the primary address; `local`: the local socket's address as packets leave it
    /// (a specific IP, not the wildcard), to recognise "no NAT".
    pub fn new(server: SocketAddr, local: SocketAddr) -> Discovery {
        Discovery {
            server,
            local,
            log: Vec::new(),
        }
    }

    /// The probes sent so far and what they got, in order.
    pub fn log(&self) -> &[(Probe, Outcome)] {
        &self.log
    }

    fn outcome(&self, test: TestId) -> Option<&Outcome> {
        self.log
            .iter()
            .find(|(p, _)| p.test == test)
            .map(|(_, o)| o)
    }

    fn mapped(&self, test: TestId) -> Option<SocketAddr> {
        match self.outcome(test) {
            Some(Outcome::Answered { mapped, .. }) => Some(*mapped),
            _ => None,
        }
    }

    /// The server's other address once test I gave a usable one.
    fn other(&self) -> Result<SocketAddr, DiscoveryError> {
        let server = self.server;
        match self.outcome(TestId::Binding) {
            None => Err(DiscoveryError::Unfinished {
                next: TestId::Binding,
            }),
            Some(Outcome::NoAnswer) => Err(DiscoveryError::NoAnswer { server }),
            Some(Outcome::Failed(reason)) => Err(DiscoveryError::Failed {
                server,
                reason: reason.clone(),
            }),
            Some(Outcome::Answered {
                other_address: None,
                ..
            }) => Err(DiscoveryError::NoOtherAddress { server }),
            Some(Outcome::Answered {
                other_address: Some(other),
                ..
            }) => {
                if other.is_ipv4() != server.is_ipv4()
                    || other.ip() == server.ip()
                    || other.port() == server.port()
                {
                    Err(DiscoveryError::BadOtherAddress {
                        server,
                        other: *other,
                    })
                } else {
                    Ok(*other)
                }
            }
        }
    }

    /// The next Binding request to send, or `None` when the procedure is over (then call
    /// [`Self::finish`]).
    pub fn next_probe(&self) -> Option<Probe> {
        let server = self.server;
        let probe = |test, to, change| Some(Probe { test, to, change });
        if self.outcome(TestId::Binding).is_none() {
            return probe(TestId::Binding, server, Change::NONE);
        }
        let other = self.other().ok()?;
        let Some(filtering_ii) = self.outcome(TestId::FilteringChangeIpAndPort) else {
            return probe(
                TestId::FilteringChangeIpAndPort,
                server,
                Change::IP_AND_PORT,
            );
        };
        if *filtering_ii == Outcome::NoAnswer && self.outcome(TestId::FilteringChangePort).is_none()
        {
            return probe(TestId::FilteringChangePort, server, Change::PORT);
        }
        let test_i = self.mapped(TestId::Binding)?;
        if test_i == self.local {
            return None;
        }
        let Some(mapping_ii) = self.outcome(TestId::MappingOtherIp) else {
            return probe(
                TestId::MappingOtherIp,
                SocketAddr::new(other.ip(), server.port()),
                Change::NONE,
            );
        };
        match mapping_ii {
            Outcome::Answered { mapped, .. } if *mapped != test_i => {}
            _ => return None,
        }
        if self.outcome(TestId::MappingOtherIpAndPort).is_none() {
            return probe(TestId::MappingOtherIpAndPort, other, Change::NONE);
        }
        None
    }

    /// Records what the probe last returned by [`Self::next_probe`] got.
    pub fn record(&mut self, test: TestId, outcome: Outcome) -> Result<(), DiscoveryError> {
        match self.next_probe() {
            Some(p) if p.test == test => {
                self.log.push((p, outcome));
                Ok(())
            }
            other => Err(DiscoveryError::UnexpectedOutcome {
                expected: other.map(|p| p.test),
                got: test,
            }),
        }
    }

    /// The classification, once [`Self::next_probe`] is `None`.
    pub fn finish(&self) -> Result<Classification, DiscoveryError> {
        if let Some(p) = self.next_probe() {
            return Err(DiscoveryError::Unfinished { next: p.test });
        }
        let other = self.other()?;
        let public = self
            .mapped(TestId::Binding)
            .ok_or(DiscoveryError::NoAnswer {
                server: self.server,
            })?;
        let mut notes = Vec::new();
        let filtering = self.filtering(other, &mut notes);
        let mapping = self.mapping(public, &mut notes);
        let nat_type = NatType::from_behaviour(mapping, filtering);
        let mut caveats = Vec::new();
        let all_open = matches!(mapping, Some(Mapping::NoNat | Mapping::EndpointIndependent))
            && filtering == Some(Filtering::EndpointIndependent);
        if !all_open {
            caveats.push(RESTRICTED_OUTBOUND_CAVEAT);
        }
        caveats.push(CURRENT_BEHAVIOUR_CAVEAT);
        Ok(Classification {
            public,
            other_address: other,
            mapping,
            filtering,
            nat_type,
            notes,
            caveats,
        })
    }

    /// Section 4.4 from the filtering tests' outcomes. An answer counts only if it came from
    /// where the CHANGE-REQUEST asked: a server ignoring the flags would otherwise make every
    /// NAT look endpoint-independent.
    fn filtering(&self, other: SocketAddr, notes: &mut Vec<String>) -> Option<Filtering> {
        let server = self.server;
        let expected_ii = other;
        let expected_iii = SocketAddr::new(server.ip(), other.port());
        let answered = |test: TestId, expected: SocketAddr, notes: &mut Vec<String>| match self
            .outcome(test)?
        {
            Outcome::Answered { from, .. } if *from == expected => Some(true),
            Outcome::Answered { from, .. } => {
                notes.push(format!(
                    "{}: the answer came from {from}, not {expected}: the server did not \
                         honour CHANGE-REQUEST",
                    test.name()
                ));
                None
            }
            Outcome::NoAnswer => Some(false),
            Outcome::Failed(reason) => {
                notes.push(format!("{}: {reason}", test.name()));
                None
            }
        };
        let ii = answered(TestId::FilteringChangeIpAndPort, expected_ii, notes)?;
        let iii = if ii {
            false
        } else {
            answered(TestId::FilteringChangePort, expected_iii, notes)?
        };
        Some(filtering_from(ii, iii))
    }

    /// Section 4.3 from the mapping tests' outcomes.
    fn mapping(&self, public: SocketAddr, notes: &mut Vec<String>) -> Option<Mapping> {
        let mut mapped = |test: TestId| match self.outcome(test) {
            Some(Outcome::Answered { mapped, .. }) => Some(*mapped),
            Some(Outcome::NoAnswer) => {
                notes.push(format!(
                    "{}: no answer from the server's other address",
                    test.name()
                ));
                None
            }
            Some(Outcome::Failed(reason)) => {
                notes.push(format!("{}: {reason}", test.name()));
                None
            }
            None => None,
        };
        if public == self.local {
            return Some(Mapping::NoNat);
        }
        let ii = mapped(TestId::MappingOtherIp)?;
        let iii = if ii == public {
            None
        } else {
            Some(mapped(TestId::MappingOtherIpAndPort)?)
        };
        mapping_from(self.local, public, Some(ii), iii)
    }
}

/// RFC 5780 section 4.3's rule: `local` the socket's address, `test_i` .. `test_iii` the
/// mapped addresses of tests I (primary address), II (other IP, primary port) and III (other
/// IP and port); `None` where a test was not run or not answered. `None` when the tests
/// cannot tell.
pub fn mapping_from(
    local: SocketAddr,
    test_i: SocketAddr,
    test_ii: Option<SocketAddr>,
    test_iii: Option<SocketAddr>,
) -> Option<Mapping> {
    if test_i == local {
        return Some(Mapping::NoNat);
    }
    let ii = test_ii?;
    if ii == test_i {
        return Some(Mapping::EndpointIndependent);
    }
    if test_iii? == ii {
        Some(Mapping::AddressDependent)
    } else {
        Some(Mapping::AddressAndPortDependent)
    }
}

/// RFC 5780 section 4.4's rule: whether test II (change IP and port) and test III (change
/// port) were answered.
pub fn filtering_from(test_ii_answered: bool, test_iii_answered: bool) -> Filtering {
    match (test_ii_answered, test_iii_answered) {
        (true, _) => Filtering::EndpointIndependent,
        (false, true) => Filtering::AddressDependent,
        (false, false) => Filtering::AddressAndPortDependent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    const SERVER: &str = "198.51.100.10:3478";
    const OTHER: &str = "198.51.100.11:3479";
    const LOCAL: &str = "203.0.113.10:5000";

    #[test]
    fn mapping_table() {
        let local = a(LOCAL);
        let p = a("192.0.2.1:6000");
        let q = a("192.0.2.1:6001");
        let r = a("192.0.2.1:6002");
        use Mapping::*;
        // Test I, II, III mapped addresses → the verdict.
        type Row = (
            SocketAddr,
            Option<SocketAddr>,
            Option<SocketAddr>,
            Option<Mapping>,
        );
        let table: [Row; 9] = [
            (local, None, None, Some(NoNat)),
            (local, Some(p), Some(q), Some(NoNat)),
            (p, Some(p), None, Some(EndpointIndependent)),
            (p, Some(p), Some(q), Some(EndpointIndependent)),
            (p, Some(q), Some(q), Some(AddressDependent)),
            (p, Some(q), Some(r), Some(AddressAndPortDependent)),
            (p, Some(q), Some(p), Some(AddressAndPortDependent)),
            (p, None, None, None),
            (p, Some(q), None, None),
        ];
        for (i, ii, iii, want) in table {
            assert_eq!(mapping_from(local, i, ii, iii), want, "{i} {ii:?} {iii:?}");
        }
        // Same IP, another port is a NAT (port translation), not "no NAT".
        assert_eq!(
            mapping_from(
                local,
                a("203.0.113.10:5001"),
                Some(a("203.0.113.10:5001")),
                None
            ),
            Some(EndpointIndependent)
        );
    }

    #[test]
    fn filtering_table() {
        assert_eq!(filtering_from(true, false), Filtering::EndpointIndependent);
        assert_eq!(filtering_from(true, true), Filtering::EndpointIndependent);
        assert_eq!(filtering_from(false, true), Filtering::AddressDependent);
        assert_eq!(
            filtering_from(false, false),
            Filtering::AddressAndPortDependent
        );
    }

    #[test]
    fn summary_table() {
        use Filtering as F;
        use Mapping as M;
        let table = [
            (
                Some(M::NoNat),
                Some(F::EndpointIndependent),
                NatType::OpenInternet,
            ),
            (
                Some(M::NoNat),
                Some(F::AddressDependent),
                NatType::FilteringFirewall,
            ),
            (
                Some(M::NoNat),
                Some(F::AddressAndPortDependent),
                NatType::FilteringFirewall,
            ),
            (
                Some(M::EndpointIndependent),
                Some(F::EndpointIndependent),
                NatType::FullCone,
            ),
            (
                Some(M::EndpointIndependent),
                Some(F::AddressDependent),
                NatType::RestrictedCone,
            ),
            (
                Some(M::EndpointIndependent),
                Some(F::AddressAndPortDependent),
                NatType::PortRestrictedCone,
            ),
            (Some(M::AddressDependent), None, NatType::Symmetric),
            (
                Some(M::AddressAndPortDependent),
                Some(F::EndpointIndependent),
                NatType::Symmetric,
            ),
            (
                Some(M::AddressAndPortDependent),
                Some(F::AddressAndPortDependent),
                NatType::Symmetric,
            ),
            (None, Some(F::EndpointIndependent), NatType::Unknown),
            (Some(M::EndpointIndependent), None, NatType::Unknown),
            (Some(M::NoNat), None, NatType::Unknown),
        ];
        for (m, f, want) in table {
            let t = NatType::from_behaviour(m, f);
            assert_eq!(t, want, "{m:?} {f:?}");
            assert_eq!(
                t.usable_for_remote_devices(),
                !matches!(want, NatType::Symmetric | NatType::Unknown)
            );
        }
    }

    fn answered(mapped: &str, from: &str) -> Outcome {
        Outcome::Answered {
            mapped: a(mapped),
            from: a(from),
            other_address: Some(a(OTHER)),
        }
    }

    /// Runs the procedure with `respond` playing network and server; returns the probes'
    /// tests in order and the result.
    fn run(
        local: &str,
        mut respond: impl FnMut(Probe) -> Outcome,
    ) -> (Vec<TestId>, Result<Classification, DiscoveryError>) {
        let mut d = Discovery::new(a(SERVER), a(local));
        let mut tests = Vec::new();
        while let Some(p) = d.next_probe() {
            tests.push(p.test);
            assert!(tests.len() <= 5, "the procedure runs at most five tests");
            let o = respond(p);
            d.record(p.test, o).unwrap();
        }
        (tests, d.finish())
    }

    /// A simulated NAT: `eim` endpoint-independent mapping (else a port per destination),
    /// `filter`: which sources get in (the server's primary address always does).
    fn nat(eim: bool, filter: Filtering) -> impl FnMut(Probe) -> Outcome {
        let server = a(SERVER);
        let other = a(OTHER);
        move |p: Probe| {
            let from = match (p.change.ip, p.change.port) {
                (false, false) => p.to,
                (true, true) => other,
                (false, true) => SocketAddr::new(p.to.ip(), other.port()),
                (true, false) => SocketAddr::new(other.ip(), p.to.port()),
            };
            let port = if eim {
                40000
            } else {
                40000 + u16::from(p.to.ip() != server.ip()) * 10 + u16::from(p.to.port() != 3478)
            };
            let lets_in = from == p.to
                || match filter {
                    Filtering::EndpointIndependent => true,
                    Filtering::AddressDependent => from.ip() == p.to.ip(),
                    Filtering::AddressAndPortDependent => false,
                };
            if lets_in {
                answered(&format!("192.0.2.1:{port}"), &from.to_string())
            } else {
                Outcome::NoAnswer
            }
        }
    }

    #[test]
    fn the_procedure_classifies_every_combination() {
        use Filtering as F;
        use TestId as T;
        let cases = [
            (
                true,
                F::EndpointIndependent,
                NatType::FullCone,
                vec![T::Binding, T::FilteringChangeIpAndPort, T::MappingOtherIp],
            ),
            (
                true,
                F::AddressDependent,
                NatType::RestrictedCone,
                vec![
                    T::Binding,
                    T::FilteringChangeIpAndPort,
                    T::FilteringChangePort,
                    T::MappingOtherIp,
                ],
            ),
            (
                true,
                F::AddressAndPortDependent,
                NatType::PortRestrictedCone,
                vec![
                    T::Binding,
                    T::FilteringChangeIpAndPort,
                    T::FilteringChangePort,
                    T::MappingOtherIp,
                ],
            ),
            (
                false,
                F::AddressAndPortDependent,
                NatType::Symmetric,
                vec![
                    T::Binding,
                    T::FilteringChangeIpAndPort,
                    T::FilteringChangePort,
                    T::MappingOtherIp,
                    T::MappingOtherIpAndPort,
                ],
            ),
        ];
        for (eim, filter, want, order) in cases {
            let (tests, result) = run(LOCAL, nat(eim, filter));
            let c = result.unwrap();
            assert_eq!(c.nat_type, want, "{eim} {filter:?}: {c:?}");
            assert_eq!(c.filtering, Some(filter));
            assert_eq!(tests, order, "{want:?}");
            assert_eq!(c.public, a("192.0.2.1:40000"));
            assert_eq!(c.other_address, a(OTHER));
            assert!(c.notes.is_empty(), "{:?}", c.notes);
            assert_eq!(
                c.caveats.contains(&RESTRICTED_OUTBOUND_CAVEAT),
                want != NatType::FullCone
            );
        }
        let (_, c) = run(LOCAL, nat(false, F::AddressAndPortDependent));
        assert_eq!(c.unwrap().mapping, Some(Mapping::AddressAndPortDependent));
    }

    #[test]
    fn address_dependent_mapping() {
        // A new port per destination address, the same for both ports of that address.
        let server = a(SERVER);
        let (_, c) = run(LOCAL, |p| {
            let port = if p.to.ip() == server.ip() {
                40000
            } else {
                40001
            };
            if p.change == Change::NONE {
                answered(&format!("192.0.2.1:{port}"), &p.to.to_string())
            } else {
                Outcome::NoAnswer
            }
        });
        let c = c.unwrap();
        assert_eq!(c.mapping, Some(Mapping::AddressDependent));
        assert_eq!(c.nat_type, NatType::Symmetric);
        assert!(!c.nat_type.usable_for_remote_devices());
    }

    #[test]
    fn no_nat_skips_the_mapping_tests() {
        let (tests, c) = run(LOCAL, |p| {
            if p.change == Change::NONE {
                answered(LOCAL, &p.to.to_string())
            } else {
                Outcome::NoAnswer
            }
        });
        let c = c.unwrap();
        assert_eq!(c.mapping, Some(Mapping::NoNat));
        assert_eq!(c.nat_type, NatType::FilteringFirewall);
        assert!(!tests.contains(&TestId::MappingOtherIp));

        let (_, c) = run(LOCAL, |p| {
            let from = match p.change {
                Change::NONE => p.to,
                Change::PORT => SocketAddr::new(p.to.ip(), 3479),
                _ => a(OTHER),
            };
            answered(LOCAL, &from.to_string())
        });
        assert_eq!(c.unwrap().nat_type, NatType::OpenInternet);
    }

    #[test]
    fn a_server_without_rfc5780_or_silent_fails_clearly() {
        let (tests, c) = run(LOCAL, |p| Outcome::Answered {
            mapped: a("192.0.2.1:40000"),
            from: p.to,
            other_address: None,
        });
        assert_eq!(tests, [TestId::Binding]);
        let e = c.unwrap_err();
        assert_eq!(e, DiscoveryError::NoOtherAddress { server: a(SERVER) });
        assert!(
            e.to_string()
                .contains("does not offer RFC 5780 behaviour discovery"),
            "{e}"
        );

        let (_, c) = run(LOCAL, |_| Outcome::NoAnswer);
        assert_eq!(
            c.unwrap_err(),
            DiscoveryError::NoAnswer { server: a(SERVER) }
        );

        for bad in [
            "198.51.100.10:3479",
            "198.51.100.11:3478",
            "[2001:db8::1]:3479",
        ] {
            let (tests, c) = run(LOCAL, |p| Outcome::Answered {
                mapped: a("192.0.2.1:40000"),
                from: p.to,
                other_address: Some(a(bad)),
            });
            assert_eq!(tests.len(), 1);
            assert!(
                matches!(c, Err(DiscoveryError::BadOtherAddress { .. })),
                "{bad}: {c:?}"
            );
        }
    }

    #[test]
    fn a_server_ignoring_change_request_leaves_filtering_unknown() {
        // Answers everything from where the request went: a broken RFC 5780 server.
        let (_, c) = run(LOCAL, |p| answered("192.0.2.1:40000", &p.to.to_string()));
        let c = c.unwrap();
        assert_eq!(c.filtering, None);
        assert_eq!(c.mapping, Some(Mapping::EndpointIndependent));
        assert_eq!(c.nat_type, NatType::Unknown);
        assert!(
            c.notes[0].contains("did not honour CHANGE-REQUEST"),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn silent_other_address_leaves_mapping_unknown_with_the_caveat() {
        // Outbound to the other address is blocked: mapping test II gets no answer.
        let server = a(SERVER);
        let (_, c) = run(LOCAL, |p| {
            if p.to.ip() == server.ip() && p.change == Change::NONE {
                answered("192.0.2.1:40000", &p.to.to_string())
            } else {
                Outcome::NoAnswer
            }
        });
        let c = c.unwrap();
        assert_eq!(c.mapping, None);
        assert_eq!(c.filtering, Some(Filtering::AddressAndPortDependent));
        assert_eq!(c.nat_type, NatType::Unknown);
        assert!(c.caveats.contains(&RESTRICTED_OUTBOUND_CAVEAT));
        assert!(c.notes[0].contains("mapping-other-ip"), "{:?}", c.notes);

        // An error answer to a filtering test.
        let (_, c) = run(LOCAL, |p| {
            if p.change == Change::NONE {
                answered("192.0.2.1:40000", &p.to.to_string())
            } else {
                Outcome::Failed("the server answered 420 Unknown Attribute".into())
            }
        });
        let c = c.unwrap();
        assert_eq!(c.filtering, None);
        assert!(c.notes[0].contains("420"), "{:?}", c.notes);
    }

    #[test]
    fn outcomes_out_of_order_are_refused() {
        let mut d = Discovery::new(a(SERVER), a(LOCAL));
        assert!(matches!(
            d.finish(),
            Err(DiscoveryError::Unfinished {
                next: TestId::Binding
            })
        ));
        let e = d
            .record(TestId::MappingOtherIp, Outcome::NoAnswer)
            .unwrap_err();
        assert_eq!(
            e,
            DiscoveryError::UnexpectedOutcome {
                expected: Some(TestId::Binding),
                got: TestId::MappingOtherIp
            }
        );
        d.record(TestId::Binding, Outcome::NoAnswer).unwrap();
        assert_eq!(d.next_probe(), None);
        assert!(d.record(TestId::Binding, Outcome::NoAnswer).is_err());
        assert_eq!(d.log().len(), 1);
    }
}
