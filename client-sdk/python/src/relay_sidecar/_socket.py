"""Where the daemon's socket is, and the channel settings grpcio needs for it."""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional, Union

from .errors import ConnectError

#: The environment variable that names the daemon's socket.
SOCKET_ENV = "RELAY_SIDECAR_SOCKET"

_SOCKET_NAME = "relay.sock"
_FALLBACK_RUNTIME_DIR = "/run/relay-sidecar"

CHANNEL_OPTIONS = (
    # grpcio puts the socket path in ``:authority``, percent-encoded, and the
    # daemon's HTTP/2 stack rejects that; a plain host name avoids it.
    ("grpc.default_authority", "localhost"),
    # A local daemon that restarts is back within moments: try again soon
    # rather than after grpc's default backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

PathLike = Union[str, "os.PathLike[str]"]


def default_socket_path(environ: Optional[Mapping[str, str]] = None) -> str:
    """The socket path when none is given.

    ``$RELAY_SIDECAR_SOCKET`` if set and not empty, else
    ``$RUNTIME_DIRECTORY/relay.sock`` (its first entry if systemd lists
    several), else ``/run/relay-sidecar/relay.sock``.
    """
    env = os.environ if environ is None else environ
    path = env.get(SOCKET_ENV, "")
    if path:
        return path
    runtime_dir = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime_dir or _FALLBACK_RUNTIME_DIR, _SOCKET_NAME)


def resolve(path: Optional[PathLike]) -> str:
    """``path`` as a string, or the default path when it is ``None``."""
    return default_socket_path() if path is None else os.fspath(path)


def probe(path: str) -> None:
    """Connects to the socket once and hangs up, so that a missing socket or
    an absent daemon is a ``ConnectError`` now rather than a gRPC call that
    waits and then fails with a vaguer message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        raise ConnectError(path, e) from e
    finally:
        sock.close()


def target(path: str) -> str:
    """The grpcio target for a Unix socket path."""
    return f"unix:{os.path.abspath(path)}"
