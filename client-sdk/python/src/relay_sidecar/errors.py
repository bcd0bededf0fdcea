"""The SDK's exceptions and the one mapping from gRPC status codes to them.

Every exception built from a daemon reply carries the daemon's message in
``message`` and the gRPC status code in ``code``.
"""

from __future__ import annotations

from typing import Optional

import grpc

__all__ = [
    "RelaySidecarError",
    "ConnectError",
    "InvalidArgumentError",
    "UnavailableError",
    "UnconfirmedError",
    "FailedPreconditionError",
    "PermissionDeniedError",
    "AlreadyExistsError",
    "AbortedError",
    "ResourceExhaustedError",
    "ProtocolError",
    "StatusError",
    "SubscriptionLostError",
]


class RelaySidecarError(Exception):
    """Base class of every error this SDK raises.

    Attributes:
        message: The daemon's message (or the SDK's, for local errors).
        code: The gRPC status code, or ``None`` for errors found locally.
    """

    #: The status code this class stands for (``None``: not a daemon reply).
    _code: Optional[grpc.StatusCode] = None
    _prefix = ""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        self.message = message
        self.code = code if code is not None else self._code
        super().__init__(f"{self._prefix}{message}")


class ConnectError(RelaySidecarError):
    """The daemon's socket could not be reached: no socket file, no daemon
    listening on it, or no permission to use it. The message names every
    path tried, why each did not answer, and how to choose a daemon.

    Attributes:
        path: The (last) socket path that was tried.
        cause: The ``OSError`` from connecting to it (also ``__cause__``).
        tried: Every path tried, in order, with its ``OSError``.
    """

    def __init__(self, path: str, cause: OSError, reason: Optional[str] = None) -> None:
        self.path = path
        self.cause = cause
        self.tried = [(path, cause)]
        reason = reason or cause.strerror or str(cause)
        super().__init__(f"cannot connect to relay-sidecar at {path}: {reason}")

    @classmethod
    def none_answered(
        cls, tried: "list[tuple[str, OSError, str]]", named: bool
    ) -> "ConnectError":
        """The error when no socket of the shared rule answered."""
        listed = "; ".join(f"{path} ({reason})" for path, _, reason in tried)
        if named:
            advice = (
                "The path came from RELAY_SIDECAR_SOCKET: start the daemon there, or unset "
                "it to look in the default places"
            )
        else:
            advice = (
                "Start one (relay-sidecar start --relay-url URL), or name its socket with "
                "RELAY_SIDECAR_SOCKET=PATH"
            )
        error = cls.__new__(cls)
        error.path, error.cause = tried[-1][0], tried[-1][1]
        error.tried = [(path, cause) for path, cause, _ in tried]
        RelaySidecarError.__init__(
            error, f"cannot connect to a relay-sidecar daemon: tried {listed}. {advice}"
        )
        return error


class InvalidArgumentError(RelaySidecarError):
    """A request field is malformed or too large; nothing was sent
    (``INVALID_ARGUMENT``). The message names the field."""

    _code = grpc.StatusCode.INVALID_ARGUMENT
    _prefix = "invalid argument: "


class UnavailableError(RelaySidecarError):
    """The relay connection was not registered in time or was lost, or the
    daemon went away; safe to retry (``UNAVAILABLE``)."""

    _code = grpc.StatusCode.UNAVAILABLE
    _prefix = "unavailable: "


class UnconfirmedError(RelaySidecarError):
    """The message was written to the relay, but the connection was lost
    before the relay confirmed it: it may or may not have been forwarded
    (``UNKNOWN``). Retrying may deliver it twice."""

    _code = grpc.StatusCode.UNKNOWN
    _prefix = "unconfirmed: "


class FailedPreconditionError(RelaySidecarError):
    """The relay connection is FAILED (refused registration, 4001, 4002 or
    4004); call ``reconnect()`` once the cause is fixed
    (``FAILED_PRECONDITION``)."""

    _code = grpc.StatusCode.FAILED_PRECONDITION
    _prefix = "failed precondition: "


class PermissionDeniedError(RelaySidecarError):
    """The daemon refused this caller (``PERMISSION_DENIED``)."""

    _code = grpc.StatusCode.PERMISSION_DENIED
    _prefix = "permission denied: "


class AlreadyExistsError(RelaySidecarError):
    """What was asked for is held by another caller: a group held exclusively,
    or one that has a subscription when ``exclusive`` was asked for
    (``ALREADY_EXISTS``)."""

    _code = grpc.StatusCode.ALREADY_EXISTS
    _prefix = "already exists: "


class AbortedError(RelaySidecarError):
    """Another local worker holds the conversation with the peer; nothing was
    sent (``ABORTED``). The message names the holder: retry once it has
    ended, or wait for it (``wait_for_conversation=True``)."""

    _code = grpc.StatusCode.ABORTED
    _prefix = "aborted: "


class ResourceExhaustedError(RelaySidecarError):
    """The host holds as many conversations as it keeps; nothing was sent
    (``RESOURCE_EXHAUSTED``)."""

    _code = grpc.StatusCode.RESOURCE_EXHAUSTED
    _prefix = "resource exhausted: "


class ProtocolError(RelaySidecarError):
    """The daemon sent something this SDK cannot understand (a malformed
    uuid, an unknown enum value, a missing field)."""

    _prefix = "protocol error: "


class SubscriptionLostError(UnavailableError):
    """A subscription's daemon stopped and did not come back within the
    subscription's ``resume`` bound, or came back as another peer (a new
    identity); the subscription has ended. Subscribe again to go on."""

    _prefix = "subscription lost: "


class StatusError(RelaySidecarError):
    """Any other gRPC status from the daemon or the transport (for example
    ``DEADLINE_EXCEEDED`` when a call's ``timeout`` ran out)."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        self._prefix = f"{code.name if code is not None else 'UNKNOWN'}: "
        super().__init__(message, code)


_BY_CODE = {
    cls._code: cls
    for cls in (
        InvalidArgumentError,
        UnavailableError,
        UnconfirmedError,
        FailedPreconditionError,
        PermissionDeniedError,
        AlreadyExistsError,
        AbortedError,
        ResourceExhaustedError,
    )
}


def from_status(code: grpc.StatusCode, details: Optional[str]) -> RelaySidecarError:
    """The SDK exception for a gRPC status code and the daemon's message."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(details or "")
    return StatusError(details or "", code)


#: Status codes by their number, as ``google.rpc.Code`` values travel in messages.
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_code_number(number: int, details: Optional[str]) -> RelaySidecarError:
    """The SDK exception for a ``google.rpc.Code`` number and its message (how
    ``SendStream`` reports one message's failure): the class ``from_status``
    gives its code; a number that is no status code is a ``ProtocolError``."""
    code = _BY_NUMBER.get(number)
    if code is None:
        return ProtocolError(f"unknown status code {number}: {details or ''}")
    return from_status(code, details)


def from_rpc_error(error: grpc.Call) -> RelaySidecarError:
    """The SDK exception for a failed gRPC call (sync or asyncio)."""
    return from_status(error.code(), error.details())
