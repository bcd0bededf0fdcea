"""The domain types the SDK speaks: what the daemon reports and carries,
without protobuf's representation."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import timedelta
from typing import Optional

__all__ = ["ConnectionState", "Counters", "DescriptionType", "PeerMessage", "Status"]


class DescriptionType(str, enum.Enum):
    """The kind of a peer connection message: a WebRTC offer or answer."""

    OFFER = "offer"
    ANSWER = "answer"

    def __str__(self) -> str:
        return self.value


class ConnectionState(enum.Enum):
    """The state of the daemon's relay connection."""

    #: Lazy mode: no connection opened yet; the first send or subscribe opens one.
    IDLE = "idle"
    #: The WebSocket handshake and the registration are under way.
    CONNECTING = "connecting"
    #: Registered with the relay: messages flow.
    REGISTERED = "registered"
    #: The last attempt failed or the connection was lost; waiting to retry.
    BACKOFF = "backoff"
    #: Unrecoverable (refused registration, 4001, 4002, 4004): no retry until
    #: ``reconnect()`` or a daemon restart.
    FAILED = "failed"
    #: The daemon is shutting down.
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Counters:
    """Message and connection counters since the daemon started."""

    #: Messages written to the relay connection.
    sent: int = 0
    #: Peer messages received from the relay (bounces included).
    received: int = 0
    #: Messages the relay returned because it could not forward them.
    bounced: int = 0
    #: Inbound messages dropped, for any reason.
    dropped: int = 0
    #: Times the connection was registered again after the first registration.
    reconnects: int = 0
    #: Open Subscribe streams now (shrinks as well as grows).
    subscribers: int = 0
    #: Frames from the relay that could not be decoded.
    undecodable: int = 0
    #: Inbound messages handed to a subscriber's stream.
    delivered: int = 0
    #: Inbound messages dropped because nobody was subscribed and the buffer was full.
    dropped_no_subscriber: int = 0
    #: Inbound messages a group lost because its members' queues were full, or
    #: that a conversation's holder lost because its queue was full.
    dropped_queue_full: int = 0
    #: Distinct workers with an open Subscribe stream now.
    workers: int = 0
    #: Conversations with remote peers held by local workers now.
    conversations: int = 0
    #: Sends and holds refused because another worker held the conversation.
    conversation_conflicts: int = 0
    #: Conversations that ended because nothing renewed them in time.
    conversations_expired: int = 0
    #: Offers from remote peers answered with a refusal.
    offers_refused: int = 0
    #: Inbound messages dropped after waiting for a subscriber past ``backlog_ttl``.
    dropped_expired: int = 0
    #: Inbound messages dropped because they belonged to no conversation and
    #: only conversation subscriptions were open.
    dropped_no_conversation: int = 0
    #: Round trips through the relay that confirmed sends; every send of a
    #: write batch shares one, whichever worker made it.
    confirmations: int = 0


@dataclasses.dataclass(frozen=True)
class Status:
    """The daemon's identity, connection state and counters."""

    #: This host's peer uuid on the relay.
    uuid: uuid.UUID
    #: This host's peer name on the relay.
    name: str
    #: The relay server's URL (``ws://`` or ``wss://``).
    relay_url: str
    #: The relay's wire dialect: ``"current"`` or ``"legacy"``.
    dialect: str
    #: The state of the relay connection.
    state: ConnectionState
    #: The WebSocket close code of the last lost connection, if one was seen.
    close_code: Optional[int]
    #: Why the connection is in its current state; empty when registered.
    detail: str
    #: Consecutive failed attempts since the last successful registration.
    attempt: int
    #: In ``BACKOFF``, the time until the next attempt; else ``None``.
    retry_in: Optional[timedelta]
    #: Message and connection counters.
    counters: Counters
    #: The daemon's version.
    version: str


@dataclasses.dataclass(frozen=True)
class PeerMessage:
    """A message from a peer, or the relay's return of one of this host's sends."""

    #: The sending peer's uuid (for a bounce, this host's own uuid).
    source_uuid: uuid.UUID
    #: The sending peer's name.
    source_name: str
    #: The receiving peer's uuid: this host, or for a bounce the peer this host
    #: tried to reach.
    peer_uuid: uuid.UUID
    #: The description type as sent. The relay does not check it, so it may be
    #: something other than ``"offer"`` or ``"answer"`` (see ``kind``).
    description_type: str
    #: The payload.
    description: str
    #: The relay's error text, set when it could not forward the message.
    error: Optional[str] = None
    #: True when the relay returned one of this host's own sends.
    bounced: bool = False

    @property
    def kind(self) -> Optional[DescriptionType]:
        """The description type, if it is ``"offer"`` or ``"answer"``."""
        try:
            return DescriptionType(self.description_type)
        except ValueError:
            return None
