//! Conversions from the generated prost types to the SDK's domain types.
//! Anything the daemon should never send is an [`Error::Protocol`].

use std::time::Duration;

use relay_sidecar_proto::v1;
use uuid::Uuid;

use crate::{ConnectionState, Counters, Error, PeerMessage, Status};

fn uuid(field: &str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value)
        .map_err(|e| Error::Protocol(format!("{field} {value:?} is not a uuid: {e}")))
}

impl TryFrom<v1::ConnectionState> for ConnectionState {
    type Error = Error;

    fn try_from(state: v1::ConnectionState) -> Result<Self, Error> {
        Ok(match state {
            v1::ConnectionState::Idle => ConnectionState::Idle,
            v1::ConnectionState::Connecting => ConnectionState::Connecting,
            v1::ConnectionState::Registered => ConnectionState::Registered,
            v1::ConnectionState::Backoff => ConnectionState::Backoff,
            v1::ConnectionState::Failed => ConnectionState::Failed,
            v1::ConnectionState::Stopping => ConnectionState::Stopping,
            v1::ConnectionState::Unspecified => {
                return Err(Error::Protocol("state is unspecified".into()));
            }
        })
    }
}

impl From<v1::Counters> for Counters {
    fn from(c: v1::Counters) -> Self {
        Counters {
            sent: c.sent,
            received: c.received,
            bounced: c.bounced,
            dropped: c.dropped,
            reconnects: c.reconnects,
            subscribers: c.subscribers,
            undecodable: c.undecodable,
            delivered: c.delivered,
            dropped_no_subscriber: c.dropped_no_subscriber,
            dropped_queue_full: c.dropped_queue_full,
            workers: c.workers,
            conversations: c.conversations,
            conversation_conflicts: c.conversation_conflicts,
            conversations_expired: c.conversations_expired,
            offers_refused: c.offers_refused,
            dropped_expired: c.dropped_expired,
            dropped_no_conversation: c.dropped_no_conversation,
            confirmations: c.confirmations,
        }
    }
}

impl TryFrom<v1::GetStatusResponse> for Status {
    type Error = Error;

    fn try_from(s: v1::GetStatusResponse) -> Result<Self, Error> {
        let state = v1::ConnectionState::try_from(s.state)
            .map_err(|_| Error::Protocol(format!("unknown connection state {}", s.state)))?
            .try_into()?;
        let close_code = match s.close_code {
            0 => None,
            code => Some(u16::try_from(code).map_err(|_| {
                Error::Protocol(format!("close_code {code} is not a WebSocket close code"))
            })?),
        };
        let retry_in = s
            .retry_in
            .map(Duration::try_from)
            .transpose()
            .map_err(|e| Error::Protocol(format!("retry_in: {e}")))?;
        Ok(Status {
            uuid: uuid("uuid", &s.uuid)?,
            name: s.name,
            relay_url: s.relay_url,
            dialect: s.dialect,
            state,
            close_code,
            detail: s.detail,
            attempt: s.attempt,
            retry_in,
            counters: s.counters.map(Counters::from).unwrap_or_default(),
            version: s.version,
        })
    }
}

impl TryFrom<v1::WatchStatusResponse> for Status {
    type Error = Error;

    fn try_from(r: v1::WatchStatusResponse) -> Result<Self, Error> {
        r.status
            .ok_or_else(|| Error::Protocol("status update without a status".into()))?
            .try_into()
    }
}

impl TryFrom<v1::PeerMessage> for PeerMessage {
    type Error = Error;

    fn try_from(m: v1::PeerMessage) -> Result<Self, Error> {
        Ok(PeerMessage {
            source_uuid: uuid("source_uuid", &m.source_uuid)?,
            source_name: m.source_name,
            peer_uuid: uuid("peer_uuid", &m.peer_uuid)?,
            description_type: m.description_type,
            description: m.description,
            error: m.error,
            bounced: m.bounced,
        })
    }
}

impl TryFrom<v1::SubscribeResponse> for PeerMessage {
    type Error = Error;

    fn try_from(r: v1::SubscribeResponse) -> Result<Self, Error> {
        r.message
            .ok_or_else(|| Error::Protocol("subscription item without a message".into()))?
            .try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DescriptionType;

    const HOST: &str = "6f1e2c1a-8a3b-4c5d-9e0f-112233445566";
    const PEER: &str = "0B0B0B0B-1111-4222-8333-444455556666";

    fn status() -> v1::GetStatusResponse {
        v1::GetStatusResponse {
            uuid: HOST.into(),
            name: "host-a".into(),
            relay_url: "ws://127.0.0.1:8700".into(),
            dialect: "current".into(),
            state: v1::ConnectionState::Backoff as i32,
            close_code: 4000,
            detail: "connection refused".into(),
            attempt: 3,
            retry_in: Some(relay_sidecar_proto::prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            counters: Some(v1::Counters {
                sent: 1,
                received: 2,
                bounced: 3,
                dropped: 4,
                reconnects: 5,
                subscribers: 6,
                undecodable: 7,
                delivered: 8,
                dropped_no_subscriber: 9,
                dropped_queue_full: 10,
                workers: 11,
                conversations: 12,
                conversation_conflicts: 13,
                conversations_expired: 14,
                offers_refused: 15,
                dropped_expired: 16,
                dropped_no_conversation: 17,
                confirmations: 18,
            }),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn status_converts_every_field() {
        let s = Status::try_from(status()).unwrap();
        assert_eq!(s.uuid, Uuid::parse_str(HOST).unwrap());
        assert_eq!((s.name.as_str(), s.dialect.as_str()), ("host-a", "current"));
        assert_eq!(s.relay_url, "ws://127.0.0.1:8700");
        assert_eq!(s.state, ConnectionState::Backoff);
        assert_eq!(s.close_code, Some(4000));
        assert_eq!((s.detail.as_str(), s.attempt), ("connection refused", 3));
        assert_eq!(s.retry_in, Some(Duration::from_millis(2500)));
        let c = s.counters;
        assert_eq!(
            [
                c.sent,
                c.received,
                c.bounced,
                c.dropped,
                c.reconnects,
                c.subscribers,
                c.undecodable,
                c.delivered,
                c.dropped_no_subscriber,
                c.dropped_queue_full,
                c.workers,
                c.conversations,
                c.conversation_conflicts,
                c.conversations_expired,
                c.offers_refused,
                c.dropped_expired,
                c.dropped_no_conversation,
                c.confirmations,
            ],
            [
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
            ]
        );
        assert_eq!(s.version, "0.1.0");
    }

    #[test]
    fn zero_close_code_and_missing_optionals_are_none() {
        let s = Status::try_from(v1::GetStatusResponse {
            close_code: 0,
            retry_in: None,
            counters: None,
            state: v1::ConnectionState::Registered as i32,
            ..status()
        })
        .unwrap();
        assert_eq!((s.close_code, s.retry_in), (None, None));
        assert_eq!(s.counters, Counters::default());
    }

    #[test]
    fn bad_status_is_a_protocol_error() {
        let bad = [
            v1::GetStatusResponse {
                uuid: "not-a-uuid".into(),
                ..status()
            },
            v1::GetStatusResponse {
                state: 0,
                ..status()
            },
            v1::GetStatusResponse {
                state: 99,
                ..status()
            },
            v1::GetStatusResponse {
                close_code: 70_000,
                ..status()
            },
            v1::GetStatusResponse {
                retry_in: Some(relay_sidecar_proto::prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..status()
            },
        ];
        for s in bad {
            let err = Status::try_from(s).unwrap_err();
            assert!(matches!(err, Error::Protocol(_)), "{err:?}");
        }
        let err = Status::try_from(v1::WatchStatusResponse { status: None }).unwrap_err();
        assert!(matches!(err, Error::Protocol(_)));
    }

    fn message() -> v1::PeerMessage {
        v1::PeerMessage {
            source_uuid: PEER.into(),
            source_name: "peer".into(),
            peer_uuid: HOST.into(),
            description_type: "offer".into(),
            description: "sdp".into(),
            error: None,
            bounced: false,
        }
    }

    #[test]
    fn peer_message_converts() {
        let m = PeerMessage::try_from(v1::SubscribeResponse {
            message: Some(message()),
        })
        .unwrap();
        assert_eq!(m.source_uuid, Uuid::parse_str(PEER).unwrap());
        assert_eq!(m.peer_uuid, Uuid::parse_str(HOST).unwrap());
        assert_eq!(
            (m.source_name.as_str(), m.description.as_str()),
            ("peer", "sdp")
        );
        assert_eq!(m.kind(), Some(DescriptionType::Offer));
        assert_eq!((m.error, m.bounced), (None, false));

        let bounce = v1::PeerMessage {
            description_type: "weird".into(),
            error: Some("unknown peer".into()),
            bounced: true,
            ..message()
        };
        let m = PeerMessage::try_from(bounce).unwrap();
        assert_eq!(m.kind(), None);
        assert_eq!(
            (m.error.as_deref(), m.bounced),
            (Some("unknown peer"), true)
        );
    }

    #[test]
    fn bad_peer_message_is_a_protocol_error() {
        let err = PeerMessage::try_from(v1::PeerMessage {
            peer_uuid: "x".into(),
            ..message()
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.starts_with("peer_uuid")),
            "{err:?}"
        );
        let err = PeerMessage::try_from(v1::SubscribeResponse { message: None }).unwrap_err();
        assert!(matches!(err, Error::Protocol(_)));
    }
}
