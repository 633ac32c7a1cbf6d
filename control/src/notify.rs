//! systemd service notifications for `homerelay run` (`Type=notify`, `WatchdogSec=` in
//! `deploy/systemd/homerelay.service`): `READY=1` once the API listens and the data path is up,
//! `WATCHDOG=1` while the daemon is alive, `STOPPING=1` when shutdown begins.
//!
//! Everything here is a no-op without `NOTIFY_SOCKET` (a daemon started by hand, in tests, under
//! another supervisor). Sending is best effort: a failed notification is logged, never fatal.
//!
//! The watchdog proves liveness rather than just existence: each ping is sent only after the
//! channel service — the one thread owning the allocator and the data-path calls — has answered
//! a pool query, and it is sent from a tokio task, so a wedged runtime or service thread stops
//! the pings and systemd restarts the daemon after `WatchdogSec=`. Pings go out at half the
//! interval systemd asks for (`WATCHDOG_USEC`), as `sd_watchdog_enabled(3)` recommends.
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use crate::service::Service;

/// The daemon's side of the notification protocol, from readiness to shutdown.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Tells systemd the daemon is ready and starts the watchdog task if systemd asked for one.
    /// Call it once the API listener is bound and the data path has started.
    pub fn ready(service: &Service) -> Notifier {
        send(&[NotifyState::Ready, NotifyState::Status("serving")]);
        let watchdog = sd_notify::watchdog_enabled().map(|timeout| {
            let every = timeout / 2;
            log::debug!("systemd watchdog: {timeout:?}, pinging every {every:?}");
            tokio::spawn(watchdog(service.clone(), every))
        });
        Notifier { watchdog }
    }

    /// Tells systemd the daemon is shutting down, and stops the watchdog pings.
    pub fn stopping(mut self) {
        self.stop_watchdog();
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    fn stop_watchdog(&mut self) {
        if let Some(task) = self.watchdog.take() {
            task.abort();
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}

/// Pings every `every` while the channel service answers within that time.
async fn watchdog(service: Service, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match tokio::time::timeout(every, service.pool()).await {
            Ok(Ok(_)) => send(&[NotifyState::Watchdog]),
            Ok(Err(e)) => log::warn!("systemd watchdog: no ping, the channel service failed: {e}"),
            Err(_) => log::warn!(
                "systemd watchdog: no ping, the channel service did not answer within {every:?}"
            ),
        }
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("notifying systemd (NOTIFY_SOCKET): {e}");
    }
}
