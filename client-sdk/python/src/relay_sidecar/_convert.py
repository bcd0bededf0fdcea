"""Conversions between the generated protobuf messages and the SDK's types.

Anything the daemon should never send is a ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Union

from ._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from ._types import ConnectionState, Counters, DescriptionType, PeerMessage, Status
from .errors import ProtocolError

_STATES = {
    pb.CONNECTION_STATE_IDLE: ConnectionState.IDLE,
    pb.CONNECTION_STATE_CONNECTING: ConnectionState.CONNECTING,
    pb.CONNECTION_STATE_REGISTERED: ConnectionState.REGISTERED,
    pb.CONNECTION_STATE_BACKOFF: ConnectionState.BACKOFF,
    pb.CONNECTION_STATE_FAILED: ConnectionState.FAILED,
    pb.CONNECTION_STATE_STOPPING: ConnectionState.STOPPING,
}

_COUNTER_FIELDS = tuple(field.name for field in dataclasses.fields(Counters))


def _uuid(field: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as e:
        raise ProtocolError(f"{field} {value!r} is not a uuid: {e}") from None


def status(message: pb.GetStatusResponse) -> Status:
    """A ``Status`` from ``GetStatusResponse``."""
    if message.state == pb.CONNECTION_STATE_UNSPECIFIED:
        raise ProtocolError("state is unspecified")
    try:
        state = _STATES[message.state]
    except KeyError:
        raise ProtocolError(f"unknown connection state {message.state}") from None
    if message.close_code > 0xFFFF:
        raise ProtocolError(f"close_code {message.close_code} is not a WebSocket close code")
    retry_in = None
    if message.HasField("retry_in"):
        if message.retry_in.seconds < 0 or message.retry_in.nanos < 0:
            raise ProtocolError("retry_in is negative")
        retry_in = message.retry_in.ToTimedelta()
    counters = Counters(**{name: getattr(message.counters, name) for name in _COUNTER_FIELDS})
    return Status(
        uuid=_uuid("uuid", message.uuid),
        name=message.name,
        relay_url=message.relay_url,
        dialect=message.dialect,
        state=state,
        close_code=message.close_code or None,
        detail=message.detail,
        attempt=message.attempt,
        retry_in=retry_in,
        counters=counters,
        version=message.version,
    )


def status_update(message: pb.WatchStatusResponse) -> Status:
    """A ``Status`` from one ``WatchStatus`` update."""
    if not message.HasField("status"):
        raise ProtocolError("status update without a status")
    return status(message.status)


def peer_message(message: pb.SubscribeResponse) -> PeerMessage:
    """A ``PeerMessage`` from one ``Subscribe`` item."""
    if not message.HasField("message"):
        raise ProtocolError("subscription item without a message")
    m = message.message
    return PeerMessage(
        source_uuid=_uuid("source_uuid", m.source_uuid),
        source_name=m.source_name,
        peer_uuid=_uuid("peer_uuid", m.peer_uuid),
        description_type=m.description_type,
        description=m.description,
        error=m.error if m.HasField("error") else None,
        bounced=m.bounced,
    )


def send_request(
    peer_uuid: Union[uuid.UUID, str],
    description_type: Union[DescriptionType, str],
    description: str,
    worker: str,
    conversation: bool = False,
    wait_for_conversation: bool = False,
) -> pb.SendRequest:
    """A ``SendRequest``. Strings pass through unchecked: the daemon validates
    them and names the bad field, so there is one source of truth."""
    if isinstance(description_type, DescriptionType):
        description_type = description_type.value
    return pb.SendRequest(
        peer_uuid=str(peer_uuid),
        description_type=str(description_type),
        description=description,
        worker=worker,
        conversation=conversation,
        wait_for_conversation=wait_for_conversation,
    )
