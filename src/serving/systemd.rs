//! systemd's notification protocol (`sd_notify(3)`), for `Type=notify`
//! units: `READY=1` once the gRPC port serves, `STOPPING=1` when the drain
//! starts, `RELOADING=1` … `READY=1` around a configuration reload, and
//! `WATCHDOG=1` at half of `WatchdogSec=` when the unit sets it.
//!
//! Every function is a no-op when `$NOTIFY_SOCKET` is unset (not started by
//! systemd), and a failure to notify is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::serving::Phase;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// `READY=1` with a status line (`systemctl status` shows it). Also the
/// end of a reload started with [`notify_reloading`].
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time systemd ≥ 253 requires; call it
/// when a reload starts, and [`notify_ready`] when it has finished (applied
/// or rolled back).
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading configuration")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]),
    }
}

/// `STOPPING=1`: the drain has started.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining in-flight requests")]);
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when systemd
/// set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2).filter(|d| !d.is_zero())
}

/// Follows the server's life cycle until it ends: `READY=1` (with `status`)
/// when it serves; `WATCHDOG=1` pings at [`watchdog_interval`] from the
/// async runtime, so a stalled runtime stops the pings and systemd restarts
/// the service. (`STOPPING=1` is sent by the drain itself, synchronously.)
pub async fn follow(mut phase: watch::Receiver<Phase>, status: String) {
    let watchdog = watchdog_interval();
    let mut ticker = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Phase::Starting;
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *phase.borrow_and_update();
                if (last, now) == (Phase::Starting, Phase::Serving) {
                    notify_ready(&status);
                }
                last = now;
            }
            _ = ticker.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
        }
    }
}
