"""Conversions from the generated messages, the error mapping, and that the
installed stubs are the repository's contract. No daemon needed."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import timedelta

import grpc
import pytest

import relay_sidecar
from relay_sidecar import _convert
from relay_sidecar._proto import PROTO_SHA256
from relay_sidecar._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from relay_sidecar.errors import from_status
from support import REPO_ROOT

HOST = "6f1e2c1a-8a3b-4c5d-9e0f-112233445566"
PEER = "0B0B0B0B-1111-4222-8333-444455556666"


def status(**fields) -> pb.GetStatusResponse:
    message = pb.GetStatusResponse(
        uuid=HOST,
        name="host-a",
        relay_url="ws://127.0.0.1:8700",
        dialect="current",
        state=pb.CONNECTION_STATE_BACKOFF,
        close_code=4000,
        detail="connection refused",
        attempt=3,
        counters=pb.Counters(sent=1, received=2, bounced=3, dropped=4, delivered=8),
        version="0.1.0",
    )
    message.retry_in.FromTimedelta(timedelta(seconds=2.5))
    for name, value in fields.items():
        if value is None:
            message.ClearField(name)
        else:
            setattr(message, name, value)
    return message


def test_the_installed_stubs_are_built_from_the_repository_proto() -> None:
    proto = REPO_ROOT / "proto" / "relay_sidecar" / "v1" / "relay_sidecar.proto"
    assert PROTO_SHA256 == hashlib.sha256(proto.read_bytes()).hexdigest(), (
        "the installed relay_sidecar was built from another version of the proto: "
        "reinstall it (pip install ./client-sdk/python)"
    )


def test_counters_cover_every_field_of_the_contract() -> None:
    sdk = {f.name for f in dataclasses.fields(relay_sidecar.Counters)}
    assert sdk == {f.name for f in pb.Counters.DESCRIPTOR.fields}


def test_status_converts_every_field() -> None:
    s = _convert.status(status())
    assert s.uuid == uuid.UUID(HOST)
    assert (s.name, s.relay_url, s.dialect) == ("host-a", "ws://127.0.0.1:8700", "current")
    assert (s.state, s.close_code, s.detail, s.attempt) == (
        relay_sidecar.ConnectionState.BACKOFF,
        4000,
        "connection refused",
        3,
    )
    assert s.retry_in == timedelta(seconds=2.5)
    assert (s.counters.sent, s.counters.bounced, s.counters.delivered) == (1, 3, 8)
    assert s.version == "0.1.0"


def test_zero_close_code_and_missing_optionals_are_none() -> None:
    s = _convert.status(
        status(close_code=0, retry_in=None, counters=None, state=pb.CONNECTION_STATE_REGISTERED)
    )
    assert (s.close_code, s.retry_in) == (None, None)
    assert s.counters == relay_sidecar.Counters()


@pytest.mark.parametrize(
    "fields",
    [
        {"uuid": "not-a-uuid"},
        {"state": pb.CONNECTION_STATE_UNSPECIFIED},
        {"state": 99},
        {"close_code": 70_000},
    ],
)
def test_bad_status_is_a_protocol_error(fields) -> None:
    with pytest.raises(relay_sidecar.ProtocolError):
        _convert.status(status(**fields))


def test_negative_retry_in_is_a_protocol_error() -> None:
    message = status()
    message.retry_in.seconds = -1
    with pytest.raises(relay_sidecar.ProtocolError, match="retry_in"):
        _convert.status(message)
    with pytest.raises(relay_sidecar.ProtocolError):
        _convert.status_update(pb.WatchStatusResponse())


def test_peer_message_converts() -> None:
    item = pb.SubscribeResponse(
        message=pb.PeerMessage(
            source_uuid=PEER,
            source_name="peer",
            peer_uuid=HOST,
            description_type="offer",
            description="sdp",
        )
    )
    m = _convert.peer_message(item)
    assert (m.source_uuid, m.peer_uuid) == (uuid.UUID(PEER), uuid.UUID(HOST))
    assert (m.kind, m.error, m.bounced) == (relay_sidecar.DescriptionType.OFFER, None, False)

    item.message.description_type = "weird"
    item.message.error = "unknown peer"
    item.message.bounced = True
    m = _convert.peer_message(item)
    assert (m.kind, m.error, m.bounced) == (None, "unknown peer", True)

    item.message.peer_uuid = "x"
    with pytest.raises(relay_sidecar.ProtocolError, match="^protocol error: peer_uuid"):
        _convert.peer_message(item)
    with pytest.raises(relay_sidecar.ProtocolError):
        _convert.peer_message(pb.SubscribeResponse())


def test_send_request_passes_values_through() -> None:
    peer = uuid.uuid4()
    r = _convert.send_request(peer, relay_sidecar.DescriptionType.ANSWER, "d", "w")
    assert (r.peer_uuid, r.description_type, r.description, r.worker) == (
        str(peer),
        "answer",
        "d",
        "w",
    )
    r = _convert.send_request("NOT-CHECKED-HERE", "offer", "d", "")
    assert (r.peer_uuid, r.description_type) == ("NOT-CHECKED-HERE", "offer")


@pytest.mark.parametrize(
    "code, cls, text",
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            relay_sidecar.InvalidArgumentError,
            "invalid argument: m",
        ),
        (grpc.StatusCode.UNAVAILABLE, relay_sidecar.UnavailableError, "unavailable: m"),
        (grpc.StatusCode.UNKNOWN, relay_sidecar.UnconfirmedError, "unconfirmed: m"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            relay_sidecar.FailedPreconditionError,
            "failed precondition: m",
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            relay_sidecar.PermissionDeniedError,
            "permission denied: m",
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, relay_sidecar.StatusError, "DEADLINE_EXCEEDED: m"),
    ],
)
def test_status_codes_map_to_errors_with_the_daemon_message(code, cls, text) -> None:
    error = from_status(code, "m")
    assert type(error) is cls
    assert (str(error), error.message, error.code) == (text, "m", code)
    assert isinstance(error, relay_sidecar.RelaySidecarError)
