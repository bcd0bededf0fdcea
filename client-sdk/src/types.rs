//! The domain types the SDK speaks: what the daemon reports and carries,
//! without prost's representation.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use uuid::Uuid;

use crate::Error;

/// The kind of a peer connection message: a WebRTC offer or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescriptionType {
    /// `"offer"`.
    Offer,
    /// `"answer"`.
    Answer,
}

impl DescriptionType {
    /// The wire name: `"offer"` or `"answer"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DescriptionType::Offer => "offer",
            DescriptionType::Answer => "answer",
        }
    }
}

impl fmt::Display for DescriptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DescriptionType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "offer" => Ok(DescriptionType::Offer),
            "answer" => Ok(DescriptionType::Answer),
            _ => Err(Error::InvalidArgument(format!(
                "unknown description type {s:?} (expected \"offer\" or \"answer\")"
            ))),
        }
    }
}

/// The state of the daemon's relay connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Lazy mode: no connection opened yet; the first send or subscribe opens one.
    Idle,
    /// The WebSocket handshake and the registration are under way.
    Connecting,
    /// Registered with the relay: messages flow.
    Registered,
    /// The last attempt failed or the connection was lost; waiting to retry.
    Backoff,
    /// Unrecoverable (refused registration, 4001, 4002, 4004): no retry until
    /// [`Client::reconnect`](crate::Client::reconnect) or a daemon restart.
    Failed,
    /// The daemon is shutting down.
    Stopping,
}

impl ConnectionState {
    /// The lower-case name: `"idle"`, `"connecting"`, `"registered"`,
    /// `"backoff"`, `"failed"` or `"stopping"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Idle => "idle",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Registered => "registered",
            ConnectionState::Backoff => "backoff",
            ConnectionState::Failed => "failed",
            ConnectionState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConnectionState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "idle" => ConnectionState::Idle,
            "connecting" => ConnectionState::Connecting,
            "registered" => ConnectionState::Registered,
            "backoff" => ConnectionState::Backoff,
            "failed" => ConnectionState::Failed,
            "stopping" => ConnectionState::Stopping,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown connection state {s:?}"
                )));
            }
        })
    }
}

/// Message and connection counters since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages written to the relay connection.
    pub sent: u64,
    /// Peer messages received from the relay (bounces included).
    pub received: u64,
    /// Messages the relay returned because it could not forward them.
    pub bounced: u64,
    /// Inbound messages dropped for lack of room in a queue or buffer.
    pub dropped: u64,
    /// Times the connection was registered again after the first registration.
    pub reconnects: u64,
    /// Open Subscribe streams now (the only counter that shrinks).
    pub subscribers: u64,
    /// Frames from the relay that could not be decoded.
    pub undecodable: u64,
    /// Inbound messages handed to a subscriber's stream.
    pub delivered: u64,
    /// Of `dropped`: lost while nobody was subscribed and the buffer was full.
    pub dropped_no_subscriber: u64,
    /// Of `dropped`: lost by a group whose members' queues were all full, or
    /// by a conversation's holder whose queue was full.
    pub dropped_queue_full: u64,
    /// Distinct workers with an open Subscribe stream now.
    pub workers: u64,
    /// Conversations held now (shrinks as well as grows).
    pub conversations: u64,
    /// Sends and holds refused because another worker held the conversation.
    pub conversation_conflicts: u64,
    /// Conversations that ended because nothing renewed them in time.
    pub conversations_expired: u64,
    /// Offers from remote peers answered with a refusal.
    pub offers_refused: u64,
    /// Of `dropped`: waited for the first subscriber longer than `backlog_ttl`.
    pub dropped_expired: u64,
    /// Of `dropped`: only conversation subscribers were there, and the
    /// message belonged to no conversation.
    pub dropped_no_conversation: u64,
    /// Round trips through the relay that confirmed sends; every send of a
    /// write batch shares one, whichever worker made it.
    pub confirmations: u64,
}

/// The daemon's identity, connection state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This host's peer uuid on the relay.
    pub uuid: Uuid,
    /// This host's peer name on the relay.
    pub name: String,
    /// The relay server's URL (`ws://` or `wss://`).
    pub relay_url: String,
    /// The relay's wire dialect: `"current"` or `"legacy"`.
    pub dialect: String,
    /// The state of the relay connection.
    pub state: ConnectionState,
    /// The WebSocket close code of the last lost connection, if one was seen.
    pub close_code: Option<u16>,
    /// Why the connection is in its current state; empty when registered.
    pub detail: String,
    /// Consecutive failed attempts since the last successful registration.
    pub attempt: u32,
    /// In [`ConnectionState::Backoff`], the time until the next attempt.
    pub retry_in: Option<Duration>,
    /// Message and connection counters.
    pub counters: Counters,
    /// The daemon's version.
    pub version: String,
}

/// A message from a peer, or the relay's return of one of this host's sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMessage {
    /// The sending peer's uuid (for a bounce, this host's own uuid).
    pub source_uuid: Uuid,
    /// The sending peer's name.
    pub source_name: String,
    /// The receiving peer's uuid: this host, or for a bounce the peer this
    /// host tried to reach.
    pub peer_uuid: Uuid,
    /// The description type as sent; the relay does not check it, so it may be
    /// something other than `"offer"` or `"answer"` (see [`PeerMessage::kind`]).
    pub description_type: String,
    /// The payload.
    pub description: String,
    /// The relay's error text, set when it could not forward the message.
    pub error: Option<String>,
    /// True when the relay returned one of this host's own sends.
    pub bounced: bool,
}

impl PeerMessage {
    /// The description type, if it is `"offer"` or `"answer"`.
    pub fn kind(&self) -> Option<DescriptionType> {
        self.description_type.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_type_round_trips() {
        for kind in [DescriptionType::Offer, DescriptionType::Answer] {
            assert_eq!(kind.to_string().parse::<DescriptionType>().unwrap(), kind);
        }
        let err = "Offer".parse::<DescriptionType>().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(m) if m.contains("\"Offer\"")));
    }

    #[test]
    fn connection_state_round_trips() {
        use ConnectionState::*;
        for state in [Idle, Connecting, Registered, Backoff, Failed, Stopping] {
            assert_eq!(state.to_string().parse::<ConnectionState>().unwrap(), state);
        }
        assert_eq!(Backoff.to_string(), "backoff");
        assert!("unspecified".parse::<ConnectionState>().is_err());
    }
}
