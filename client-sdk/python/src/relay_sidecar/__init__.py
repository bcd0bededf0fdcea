"""Python client for relay-sidecar, the daemon that shares one host's
ProxyStore relay registration with every local process over gRPC on a Unix
socket.

Every process that uses it sends and receives as the host's one peer
identity::

    import relay_sidecar

    with relay_sidecar.Client() as client:  # $RELAY_SIDECAR_SOCKET, else yours or the host's
        print("we are", client.status().uuid)
        with client.subscribe() as messages:
            client.send(peer_uuid, "offer", "v=0 ...")
            for message in messages:
                print(message.source_name, "says", message.description)

``relay_sidecar.aio.Client`` is the asyncio twin, and
``relay_sidecar.proxystore.SidecarRelayClient`` puts a ProxyStore
``PeerManager`` on the daemon.
"""

from __future__ import annotations

import importlib.metadata

from . import aio
from ._paths import JOB_ENV, socket_candidates
from ._socket import SOCKET_ENV, default_socket_path
from ._types import ConnectionState, Counters, DescriptionType, PeerMessage, Status
from .client import (
    CLOSE_WITHIN,
    RESUME_WITHIN,
    SESSION_IN_FLIGHT,
    Client,
    Session,
    StatusStream,
    Subscription,
)
from .errors import (
    AbortedError,
    AlreadyExistsError,
    ConnectError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ProtocolError,
    RelaySidecarError,
    ResourceExhaustedError,
    StatusError,
    SubscriptionLostError,
    UnavailableError,
    UnconfirmedError,
)

try:
    __version__ = importlib.metadata.version("relay-sidecar")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0+unknown"

__all__ = [
    "CLOSE_WITHIN",
    "JOB_ENV",
    "RESUME_WITHIN",
    "SESSION_IN_FLIGHT",
    "SOCKET_ENV",
    "aio",
    "AbortedError",
    "AlreadyExistsError",
    "Client",
    "ConnectError",
    "ConnectionState",
    "Counters",
    "DescriptionType",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "PeerMessage",
    "PermissionDeniedError",
    "ProtocolError",
    "RelaySidecarError",
    "ResourceExhaustedError",
    "Session",
    "Status",
    "StatusError",
    "StatusStream",
    "Subscription",
    "SubscriptionLostError",
    "UnavailableError",
    "UnconfirmedError",
    "default_socket_path",
    "socket_candidates",
]
