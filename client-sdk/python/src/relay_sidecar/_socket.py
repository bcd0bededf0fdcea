"""Which socket a client connects to, and the channel settings grpcio needs
for it. The rule that names the sockets is in ``_paths``."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
from typing import List, Mapping, Optional, Tuple, Union

from ._paths import SOCKET_ENV, socket_candidates
from .errors import ConnectError

__all__ = ["SOCKET_ENV", "CHANNEL_OPTIONS", "default_socket_path", "find", "resolve", "target"]

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
    """The socket a client uses when none is given: of the sockets the shared
    rule names (``$RELAY_SIDECAR_SOCKET`` alone when set; else the user's own
    daemon's, ``$XDG_RUNTIME_DIR/relay-sidecar/relay.sock`` and
    ``/tmp/relay-sidecar-$UID/relay.sock``, then the system service's
    ``/run/relay-sidecar/relay.sock``), the first that exists, else the
    first."""
    candidates = socket_candidates(environ)
    return next((path for path in candidates if os.path.exists(path)), candidates[0])


def resolve(path: Optional[PathLike]) -> str:
    """``path`` as a string, or ``default_socket_path()`` when it is ``None``
    (for messages and for handing a path on; connecting uses ``find``)."""
    return default_socket_path() if path is None else os.fspath(path)


def find(path: Optional[PathLike]) -> str:
    """The socket to use: ``path``, or by the shared rule the first socket a
    daemon answers on. Connects once to each tried (and hangs up), so that a
    missing socket or an absent daemon is a ``ConnectError`` now, naming
    every path tried and why, rather than a gRPC call that waits and then
    fails with a vaguer message."""
    if path is not None:
        given = os.fspath(path)
        error = _probe(given)
        if error is not None:
            raise ConnectError(given, error, why_not(given, error))
        return given
    try:
        candidates = socket_candidates()
    except ValueError as e:
        raise ConnectError("", OSError(errno.EINVAL, str(e)), str(e)) from None
    tried: List[Tuple[str, OSError]] = []
    for candidate in candidates:
        error = _probe(candidate)
        if error is None:
            return candidate
        tried.append((candidate, error))
    raise ConnectError.none_answered(
        [(p, e, why_not(p, e)) for p, e in tried], named=bool(os.environ.get(SOCKET_ENV))
    )


def _probe(path: str) -> Optional[OSError]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        return e
    finally:
        sock.close()
    return None


def why_not(path: str, error: OSError) -> str:
    """Why connecting to ``path`` failed, in words that suggest the fix."""
    if error.errno == errno.ENOENT:
        return "no such socket"
    if error.errno == errno.ECONNREFUSED:
        return "nobody listening: a socket left by a daemon that stopped"
    if error.errno in (errno.EACCES, errno.EPERM):
        try:
            info = os.stat(path)
        except OSError:
            return f"permission denied: its directory {os.path.dirname(path)} is closed to you"
        try:
            owner = pwd.getpwuid(info.st_uid).pw_name
        except KeyError:
            owner = str(info.st_uid)
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return (
            f"permission denied: the socket has mode {stat.S_IMODE(info.st_mode):04o}, "
            f"owner {owner}, group {group}; ask to be added to group {group}"
        )
    return error.strerror or str(error)


def target(path: str) -> str:
    """The grpcio target for a Unix socket path."""
    return f"unix:{os.path.abspath(path)}"
