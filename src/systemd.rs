//! systemd integration (`Type=notify-reload`): readiness, reloads, stopping, status and the
//! watchdog, through `$NOTIFY_SOCKET` (nothing happens without it); and sockets handed
//! over by socket activation (`$LISTEN_FDS`, named by `FileDescriptorName=` after the
//! listeners they serve).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// Every listener is bound and the first health round is done.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (`READY=1` follows with [`ready`]).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Draining: no new connections.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A status line (`systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// After an upgrade hand-over: this process is the service's main process now (its
/// `READY=1` comes once its first health round is done; the unit needs
/// `NotifyAccess=all` for systemd to take either from it).
pub fn main_pid() {
    send(&[NotifyState::MainPid(std::process::id())]);
}

/// One watchdog ping.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often systemd wants a ping (`WatchdogSec=`), if it does.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Sockets passed by socket activation, by name (`FileDescriptorName=` of the socket
/// unit, or `LISTEN_FDNAMES`); several with one name serve one listener together.
/// Empty without socket activation.
pub fn activated_sockets() -> BTreeMap<String, Vec<OwnedFd>> {
    let mut out: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    if std::env::var_os("LISTEN_FDS").is_none() {
        return out;
    }
    let fds: Vec<(RawFd, String)> = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            tracing::warn!(error = %e, "socket activation: LISTEN_FDS is set but unusable");
            return out;
        }
    };
    for (fd, name) in fds {
        // SAFETY: systemd passed these descriptors to this process, once each, and
        // nothing else in the process owns them.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        out.entry(name).or_default().push(owned);
    }
    out
}
