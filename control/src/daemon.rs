//! One way to build the running channel service from a [`Config`]: the relay (with its event
//! sink wired to the service's owner), the allocator, the state database and the service. Used
//! by `homerelay run`, the benchmarks and the tests, so they all run the same assembly.
//!
//! The invariant a reader must know: **the owner's queue exists before the data path starts**,
//! so not a single latch or fast-path event is lost between the relay's start and the service's.
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use relay_core::{Allocator, HostAddresses as _};
use relay_store::Store;
use relay_user::{Relay, RelayOptions};

use crate::config::{Config, LayoutName};
use crate::devices::Registry;
use crate::host::HostTable;
use crate::metrics::Metrics;
use crate::service::{Dataplane, Queue, Service, ServiceOptions, ServiceParts};

/// Starts the relay: by default [`Relay::start`] in the calling thread's namespace.
pub type RelayStarter<'a> = Box<dyn FnOnce(RelayOptions) -> anyhow::Result<Relay> + Send + 'a>;

/// The running service and what it runs on.
#[derive(Debug)]
pub struct Daemon {
    pub service: Service,
    /// The relay, unless the builder was given another data path.
    pub relay: Option<Arc<Relay>>,
    pub layout_name: LayoutName,
}

/// Builds a [`Daemon`] from a configuration (see the module summary).
pub struct DaemonBuilder<'a> {
    config: Config,
    metrics: Metrics,
    seed: Option<u64>,
    start_relay: Option<RelayStarter<'a>>,
    dataplane: Option<Arc<dyn Dataplane>>,
    host: Option<Arc<HostTable>>,
}

impl std::fmt::Debug for DaemonBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonBuilder")
            .field("config", &self.config)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<'a> DaemonBuilder<'a> {
    /// A builder for `config` (validated again by [`DaemonBuilder::build`]).
    pub fn new(config: Config) -> DaemonBuilder<'a> {
        DaemonBuilder {
            config,
            metrics: Metrics::disabled(),
            seed: None,
            start_relay: None,
            dataplane: None,
            host: None,
        }
    }

    /// Counts in `metrics` (default: a disabled registry).
    pub fn metrics(mut self, metrics: Metrics) -> DaemonBuilder<'a> {
        self.metrics = metrics;
        self
    }

    /// Seeds the allocator's port choice (default: random), for reproducible tests.
    pub fn seed(mut self, seed: u64) -> DaemonBuilder<'a> {
        self.seed = Some(seed);
        self
    }

    /// Starts the relay with `start` instead of in the calling thread's namespace (a test's
    /// relay namespace). `start` gets the options from the configuration, event sink included.
    pub fn start_relay_with(
        mut self,
        start: impl FnOnce(RelayOptions) -> anyhow::Result<Relay> + Send + 'a,
    ) -> DaemonBuilder<'a> {
        self.start_relay = Some(Box::new(start));
        self
    }

    /// Checks addresses against `host` instead of the calling process's namespace (a test
    /// whose relay runs in another namespace than the control plane).
    pub fn host_addresses(mut self, host: HostTable) -> DaemonBuilder<'a> {
        self.host = Some(Arc::new(host));
        self
    }

    /// Runs on `dataplane` instead of a relay (the control plane's own benchmark).
    pub fn dataplane(mut self, dataplane: Arc<dyn Dataplane>) -> DaemonBuilder<'a> {
        self.dataplane = Some(dataplane);
        self
    }

    /// Opens the state database, starts the relay and the service, and takes over what a
    /// previous run left (see [`Service::start`]).
    pub fn build(self) -> anyhow::Result<Daemon> {
        let config = self.config;
        config.validate()?;
        let (layout, layout_name) = config.layout()?;
        let seed = self.seed.unwrap_or_else(|| {
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), Instant::now())
        });
        let allocator = Allocator::new(config.allocator_config(seed), Instant::now())
            .context("starting the channel allocator")?;
        // The store before the data path: a second daemon on the same state fails here,
        // before it touches the pinned maps of the first.
        let store = if config.store.enabled {
            Some(Store::open(&config.store.path).with_context(|| {
                format!(
                    "opening the state database {} (store.path)",
                    config.store.path.display()
                )
            })?)
        } else {
            None
        };
        // The relay sends from its relay addresses: they must be the host's own.
        let host = self.host.unwrap_or_else(|| Arc::new(HostTable::new()));
        for (key, addr) in [
            ("relay.internet_address", config.relay.internet_address),
            ("relay.lan_address", config.relay.lan_address),
            // STUN requests are sent from it.
            (
                "public_address.local_address",
                config.public_address.local_address,
            ),
        ] {
            if let Some(addr) = addr
                && !host.is_local(addr)
            {
                anyhow::bail!(
                    "{key} = {addr} is not an address of this host (see `ip -4 address`): the \
                     relay could not send from it"
                );
            }
        }
        let devices = Arc::new(
            Registry::open(
                store.as_ref().map(Store::devices).transpose()?,
                config.registry_policy()?,
            )
            .context("loading the device registry")?,
        );
        let queue = Queue::default();
        let (relay, dataplane): (Option<Arc<Relay>>, Arc<dyn Dataplane>) = match self.dataplane {
            Some(dp) => (None, dp),
            None => {
                let options = RelayOptions {
                    events: Some(queue.events()),
                    ..config.relay_options()
                };
                let relay = match self.start_relay {
                    Some(start) => start(options)?,
                    None => Relay::start(options)?,
                };
                let relay = Arc::new(relay);
                (Some(relay.clone()), relay)
            }
        };
        log::info!(
            "channel pool: UDP {}-{} ({} channels, layout {})",
            layout.first_port(),
            layout.last_port(),
            layout.capacity(),
            layout_name.name()
        );
        let service = Service::start(
            queue,
            ServiceParts {
                allocator,
                relay: dataplane,
                options: ServiceOptions {
                    relay_addresses: config.relay_addresses(),
                    event_buffer: config.events.buffer,
                    layout_name: layout_name.name(),
                    host,
                    allow_local_peers: config.relay.allow_local_peers,
                    devices,
                    public_address: crate::public_address::PublicAddress::new(
                        crate::public_address::PublicStatus::from_config(&config),
                    ),
                },
                metrics: self.metrics,
                store,
            },
        )
        .context("starting the channel service")?;
        Ok(Daemon {
            service,
            relay,
            layout_name,
        })
    }
}
