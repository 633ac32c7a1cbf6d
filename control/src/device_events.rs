//! Device events: registrations, unregistrations, refused registrations, lockouts and refused
//! calls, published by the device registry on one broadcast bus (every transport: TCP 4062,
//! TLS 4063, HTTPS 8802; and the SBC's call policy) and streamed to gRPC clients by
//! `DeviceService.WatchDevices`. Events are not stored or replayed: a subscriber sees what
//! happens after it subscribed; one that falls behind by more than the buffer is told how many
//! it missed.
use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::sync::broadcast;

/// Events buffered per subscriber before it lags.
pub const BUFFER: usize = 1024;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEventKind {
    /// A device registered (or re-registered).
    Registered,
    /// A registration ended (unregistered, connection lost, expired, device deleted).
    Unregistered,
    /// A registration was refused; `reason` names the refusal (`auth_failed` for an unknown
    /// device and a wrong password alike).
    RegistrationRefused,
    /// Repeated failures locked a device or a source out.
    LockedOut,
    /// The SBC's call policy refused a call or a call forwarding; `reason` says why.
    CallRefused,
}

impl DeviceEventKind {
    /// Stable lowercase name (logs, CLI).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceEventKind::Registered => "registered",
            DeviceEventKind::Unregistered => "unregistered",
            DeviceEventKind::RegistrationRefused => "registration_refused",
            DeviceEventKind::LockedOut => "locked_out",
            DeviceEventKind::CallRefused => "call_refused",
        }
    }
}

/// One device event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEvent {
    pub kind: DeviceEventKind,
    /// The device's number as the client named it (for a refusal possibly not a known one).
    pub number: String,
    /// `tcp`, `tls` or `https`; empty for call events.
    pub transport: &'static str,
    /// The source address the relay saw, if the event has one.
    pub source: Option<SocketAddr>,
    /// Whether the source is outside the internal networks.
    pub external: bool,
    /// The refusal's name or the policy's reason; empty otherwise.
    pub reason: String,
    pub at: SystemTime,
}

/// The bus: cheap to clone, publishing never blocks (nobody listening is fine).
#[derive(Clone, Debug)]
pub struct DeviceEvents {
    tx: broadcast::Sender<DeviceEvent>,
}

impl Default for DeviceEvents {
    fn default() -> Self {
        DeviceEvents {
            tx: broadcast::channel(BUFFER).0,
        }
    }
}

impl DeviceEvents {
    /// Publishes `event` to every current subscriber.
    pub fn publish(&self, event: DeviceEvent) {
        let _ = self.tx.send(event);
    }

    /// A new subscriber, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.tx.subscribe()
    }
}
