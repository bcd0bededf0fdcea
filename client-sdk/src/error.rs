//! The SDK's error type and the one mapping from gRPC status codes to it.

use std::path::PathBuf;

use tonic::Code;

/// Why a call to the daemon failed.
///
/// The variants a caller is expected to act on have their own case; every
/// variant built from a daemon reply carries the daemon's message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon's socket could not be reached (missing socket, no daemon
    /// listening, no permission on the socket file).
    #[error("cannot connect to relay-sidecar at {}", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// No daemon answered at any socket the shared rule names
    /// ([`crate::paths`]): the message lists each path tried, why it did not
    /// answer, and how to choose a daemon.
    #[error("{0}")]
    NoDaemon(crate::NoDaemon),
    /// A subscription's daemon stopped and did not come back within the
    /// subscription's bound, or came back as another peer; the stream ends.
    #[error("subscription lost: {0}")]
    SubscriptionLost(String),
    /// A request field is malformed or too large; nothing was sent
    /// (`INVALID_ARGUMENT`). Also returned locally when a string does not
    /// parse as one of the SDK's enums.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The relay connection was not registered in time or was lost; safe to
    /// retry (`UNAVAILABLE`).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The message was written to the relay, but the connection was lost
    /// before the relay confirmed it: it may or may not have been forwarded
    /// (`UNKNOWN`). Retrying may deliver it twice.
    #[error("unconfirmed: {0}")]
    Unconfirmed(String),
    /// The relay connection is FAILED; call [`Client::reconnect`] once the
    /// cause is fixed (`FAILED_PRECONDITION`).
    ///
    /// [`Client::reconnect`]: crate::Client::reconnect
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The daemon refused this caller (`PERMISSION_DENIED`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// What was asked for is held by someone else: an exclusive group that
    /// has (or is held by) another subscription (`ALREADY_EXISTS`).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Another local worker holds the conversation with the peer; nothing
    /// was sent (`ABORTED`). The message names the holder; retry once it
    /// has ended, or wait for it with
    /// [`SendOptions::wait_for_conversation`](crate::SendOptions::wait_for_conversation).
    #[error("aborted: {0}")]
    Aborted(String),
    /// The host holds as many conversations as it keeps; nothing was sent
    /// (`RESOURCE_EXHAUSTED`).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The daemon sent something this SDK cannot understand (a malformed
    /// uuid, an unknown enum value, a missing field).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Any other gRPC status from the daemon or the transport.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = || status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(message()),
            Code::Unavailable => Error::Unavailable(message()),
            Code::Unknown => Error::Unconfirmed(message()),
            Code::FailedPrecondition => Error::FailedPrecondition(message()),
            Code::PermissionDenied => Error::PermissionDenied(message()),
            Code::AlreadyExists => Error::AlreadyExists(message()),
            Code::Aborted => Error::Aborted(message()),
            Code::ResourceExhausted => Error::ResourceExhausted(message()),
            _ => Error::Status(status),
        }
    }
}

impl Error {
    /// The connect error for `path`, keeping the I/O cause that tonic wraps.
    pub(crate) fn connect(path: PathBuf, err: tonic::transport::Error) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                let source = match io.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(io.kind(), io.to_string()),
                };
                return Error::Connect { path, source };
            }
            cause = e.source();
        }
        Error::Connect {
            path,
            source: std::io::Error::other(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_variants_with_the_daemon_message() {
        let cases = [
            (
                tonic::Status::invalid_argument("peer_uuid: bad"),
                "invalid argument: peer_uuid: bad",
            ),
            (
                tonic::Status::unavailable("not registered"),
                "unavailable: not registered",
            ),
            (
                tonic::Status::unknown("connection lost"),
                "unconfirmed: connection lost",
            ),
            (
                tonic::Status::failed_precondition("4004"),
                "failed precondition: 4004",
            ),
            (
                tonic::Status::permission_denied("uid 7"),
                "permission denied: uid 7",
            ),
            (
                tonic::Status::already_exists("group: held"),
                "already exists: group: held",
            ),
            (
                tonic::Status::aborted("conversation: held"),
                "aborted: conversation: held",
            ),
            (
                tonic::Status::resource_exhausted("conversation: full"),
                "resource exhausted: conversation: full",
            ),
        ];
        for (status, text) in cases {
            assert_eq!(Error::from(status).to_string(), text);
        }
        assert!(matches!(
            Error::from(tonic::Status::invalid_argument("x")),
            Error::InvalidArgument(m) if m == "x"
        ));
    }

    #[test]
    fn other_codes_keep_the_status() {
        let err = Error::from(tonic::Status::deadline_exceeded("too slow"));
        match &err {
            Error::Status(s) => assert_eq!(s.code(), Code::DeadlineExceeded),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().ends_with(": too slow"), "{err}");
    }
}
