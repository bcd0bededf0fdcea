//! Working under systemd: the listening socket a socket unit hands over
//! (`LISTEN_FDS`), and notifications on `NOTIFY_SOCKET`: READY=1 once the
//! socket serves, STATUS= at every change of the relay link, watchdog
//! keep-alives, STOPPING=1 at shutdown. Without systemd all of it is a no-op.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::status::LinkStatus;

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS: systemd passed {0} sockets; the daemon serves on exactly one")]
    Count(usize),
    #[error("LISTEN_FDS: the socket systemd passed is not a listening Unix stream socket: {0}")]
    NotUnixStream(std::io::Error),
}

/// Takes the listening socket passed by socket activation, if this process
/// was given one (`LISTEN_FDS`, with `LISTEN_PID` naming this process).
///
/// Call it before any thread is started: it clears those variables from the
/// environment, so that they are not inherited, and changing the
/// environment while other threads may read it is not sound. `listenfd`
/// checks that the descriptor is a Unix stream socket and wraps it; doing
/// that here would need `unsafe` (`FromRawFd`), which this workspace denies.
pub fn take_listener() -> Result<Option<UnixListener>, ActivationError> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.len() {
        0 => Ok(None),
        1 => fds
            .take_unix_listener(0)
            .map_err(ActivationError::NotUnixStream),
        n => Err(ActivationError::Count(n)),
    }
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The socket is bound and served: READY=1.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Shutdown has begun: STOPPING=1.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Until `shutdown`: a watchdog keep-alive every half of `WATCHDOG_USEC`
/// (when systemd set one for this process), and the relay link's state as
/// STATUS= at every change, for `systemctl status`.
pub async fn run(mut states: watch::Receiver<LinkStatus>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let period = sd_notify::watchdog_enabled().map(|timeout| timeout / 2);
    if let Some(period) = period {
        debug!(?period, "sending watchdog keep-alives");
    }
    // An interval that never fires when there is no watchdog.
    let mut keep_alive = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    // False once the relay task has ended: the watchdog is still fed until
    // shutdown completes.
    let mut open = true;
    loop {
        let link = states.borrow_and_update().clone();
        if last != Some((link.state, link.close_code)) {
            last = Some((link.state, link.close_code));
            notify(&[NotifyState::Status(&status_line(&link))]);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = keep_alive.tick() => {
                if period.is_some() {
                    notify(&[NotifyState::Watchdog]);
                }
            }
            changed = states.changed(), if open => open = changed.is_ok(),
        }
    }
}

/// One line: a newline would end the STATUS= assignment early.
fn status_line(link: &LinkStatus) -> String {
    let mut status = format!("relay {}", link.state);
    if !link.detail.is_empty() {
        status.push_str(": ");
        status.extend(
            link.detail
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c }),
        );
    }
    status
}
