"""``configure``, ``start``, ``stop``, ``list`` and ``remove`` for endpoints on the daemon.

The endpoints are ordinary ProxyStore endpoints: their configs live in
ProxyStore's home directory (``$PROXYSTORE_HOME``) in ProxyStore's format, and
their pid files where ProxyStore keeps them, so ``EndpointConnector`` finds
them and ProxyStore's own ``list``, ``stop`` and ``remove`` (used here as
they are) manage them. What differs is who holds the relay connection: the
config's uuid and relay address are the daemon's, and ``start`` serves the
endpoint through the daemon. Failures raise ``EndpointError`` with the message
a user needs; the CLI prints it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

from proxystore import utils as proxystore_utils
from proxystore.endpoint import commands as proxystore_commands
from proxystore.endpoint.commands import EndpointStatus, get_status
from proxystore.endpoint.config import (
    ENDPOINT_DATABASE_FILE,
    EndpointConfig,
    EndpointRelayAuthConfig,
    EndpointRelayConfig,
    EndpointStorageConfig,
    get_configs,
    get_log_filepath,
    get_pid_filepath,
    read_config,
    validate_name,
    write_config,
)
from proxystore.utils.environment import home_dir

from .. import Client, ConnectionState, RelaySidecarError, Status
from .._socket import PathLike, resolve
from . import compat
from .errors import EndpointError, IdentityMismatchError

__all__ = [
    "configure",
    "list_endpoints",
    "remove",
    "start",
    "stop",
]

logger = logging.getLogger(__name__)

#: How long a status call to the daemon may take: it answers at once when it
#: is alive.
STATUS_TIMEOUT = 10.0
#: How often ``start`` looks at a detached endpoint while it waits.
POLL_INTERVAL = 0.1
#: How long one look may take: a local HTTP answer, so a second is plenty.
PROBE_TIMEOUT = 1.0
#: Log lines of a detached endpoint that failed to start shown to the user.
FAILURE_LOG_LINES = 30
#: How long a stopping endpoint gets after SIGTERM before SIGKILL, when a
#: start that timed out ends it.
STOP_GRACE = 5.0
#: The port range ProxyStore's ``configure`` picks from, and how many random
#: picks are tried before giving up on finding one free.
PORT_RANGE = (10 * 1024, 20 * 1024)
PORT_TRIES = 20


#: Looks at the endpoint directly, never through $http_proxy (often set on
#: clusters, and a proxy cannot reach this host's endpoint).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def configure(
    name: str,
    *,
    socket_path: Optional[PathLike] = None,
    host: str = "ip",
    port: Optional[int] = None,
    peer_channels: int = 1,
    persist: bool = False,
) -> EndpointConfig:
    """Writes endpoint ``name``'s config for the daemon on ``socket_path``.

    The uuid and relay address are the daemon's, relay auth is left to the
    daemon (``method`` unset); the rest is what ``proxystore-endpoint
    configure`` would write with the same options.
    """
    version = compat.check_proxystore()
    if not validate_name(name):
        raise EndpointError(
            f"{name!r} is not a valid endpoint name: use letters, digits, dashes and underscores"
        )
    home = home_dir()
    endpoint_dir = os.path.join(home, name)
    if os.path.exists(endpoint_dir):
        raise EndpointError(
            f"An endpoint named {name} already exists ({endpoint_dir}); to "
            f"reconfigure it, remove it and try again: relay-sidecar-endpoint remove {name}"
        )
    status = daemon_status(socket_path)
    if status.uuid.version != 4 or status.uuid.variant != uuid.RFC_4122:
        # EndpointConfig and EndpointConnector read endpoint uuids as version
        # 4, which rewrites the version bits of any other: the endpoint would
        # never match its own config.
        raise EndpointError(
            f"the relay-sidecar daemon's uuid {status.uuid} is not a version-4 uuid, "
            "which ProxyStore endpoints need; give the daemon one (its `uuid` "
            "setting, e.g. from `python3 -c 'import uuid; print(uuid.uuid4())'`)"
        )
    for other in get_configs(home):
        if uuid.UUID(other.uuid) == status.uuid:
            raise EndpointError(
                f"endpoint {other.name} is already this daemon's endpoint (uuid "
                f"{status.uuid}); a daemon serves one endpoint: use {other.name}, or "
                f"remove it first (relay-sidecar-endpoint remove {other.name})"
            )

    kind = host.lower().strip()
    found_at_start = kind in ("ip", "fqdn")
    # Before 1.0 `host` has no default, and start always sets it to the IP.
    options = {"host": None if found_at_start else host}
    if compat.has_host_type(version):
        options["host_type"] = kind if found_at_start else "static"
    elif kind != "ip":
        raise EndpointError(
            "--host needs ProxyStore 1.0 or later; this one always publishes the IP address"
        )
    try:
        config = EndpointConfig(
            name=name,
            uuid=str(status.uuid),
            port=port if port is not None else _free_port(),
            relay=EndpointRelayConfig(
                address=status.relay_url,
                auth=EndpointRelayAuthConfig(method=None),
                peer_channels=peer_channels,
            ),
            storage=EndpointStorageConfig(
                database_path=os.path.join(endpoint_dir, ENDPOINT_DATABASE_FILE)
                if persist
                else None
            ),
            **options,
        )
    except (TypeError, ValueError) as e:
        raise EndpointError(str(e)) from None
    write_config(config, endpoint_dir)

    logger.info(f"Configured endpoint: {config.name} <{config.uuid}>")
    logger.info(f"Config and log file directory: {endpoint_dir}")
    logger.info(
        f"It peers through relay-sidecar at {resolve(socket_path)}, registered "
        f"with {status.relay_url} as {status.name}"
    )
    logger.info("Start the endpoint with:")
    logger.info(f"  $ relay-sidecar-endpoint start {config.name}")
    _warn_displacement(config)
    return config


def start(
    name: str,
    *,
    socket_path: Optional[PathLike] = None,
    detach: bool = True,
    timeout: float,
    log_level: str = "INFO",
) -> None:
    """Starts endpoint ``name`` on the daemon.

    Waits up to ``timeout`` seconds for the daemon to answer. Detached, the
    endpoint runs in a new session and this returns once it serves, or fails
    with the endpoint's own words from its log; one that does not serve
    within ``timeout`` seconds is stopped.
    """
    version = compat.check_proxystore()
    home = home_dir()
    endpoint_dir = os.path.join(home, name)
    config = _startable(name, home, socket_path, timeout)
    if detach:
        _start_detached(name, endpoint_dir, config, socket_path, timeout, log_level)
        return

    hostname = _resolve_host(config, endpoint_dir)
    if get_status(name, home) is EndpointStatus.HANGING:
        _remove_stale_pid_file(name, home, config, hostname)
    config.host = hostname
    write_config(config, endpoint_dir)
    from .serve import serve  # imports uvicorn, quart and aiortc: slow

    with _pid_file(get_pid_filepath(endpoint_dir), name):
        serve(
            config,
            socket_path,
            version=version,
            log_level=log_level,
            log_file=get_log_filepath(endpoint_dir),
        )


def stop(name: str) -> int:
    """ProxyStore's ``stop``: SIGTERM to the endpoint's process (then SIGKILL)."""
    return proxystore_commands.stop_endpoint(name)


def list_endpoints() -> int:
    """ProxyStore's ``list``: every endpoint in ``$PROXYSTORE_HOME``."""
    return proxystore_commands.list_endpoints()


def remove(name: str) -> int:
    """ProxyStore's ``remove``: deletes a stopped endpoint's directory."""
    return proxystore_commands.remove_endpoint(name)


def daemon_status(socket_path: Optional[PathLike], wait: float = 0.0) -> Status:
    """The daemon's status, waiting up to ``wait`` seconds for a daemon to
    answer (one started just before, in a job script); else an
    ``EndpointError`` saying that none answers."""
    path = resolve(socket_path)
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            with Client(path) as client:
                return client.status(timeout=STATUS_TIMEOUT)
        except RelaySidecarError as e:
            if time.monotonic() >= deadline:
                waited = f" after {wait:g}s" if wait else ""
                raise EndpointError(
                    f"no relay-sidecar daemon answers at {path}{waited} ({e}); start "
                    "one, or name its socket with --socket or $RELAY_SIDECAR_SOCKET"
                ) from None
        if not waiting:
            logger.info(f"Waiting up to {wait:g}s for the relay-sidecar daemon at {path}")
            waiting = True
        time.sleep(POLL_INTERVAL)


def _startable(
    name: str, home: str, socket_path: Optional[PathLike], wait: float
) -> EndpointConfig:
    """The endpoint's config once it is known that starting it on this daemon
    is right (waiting up to ``wait`` seconds for the daemon to answer); logs
    the warnings about it."""
    status = get_status(name, home)
    if status is EndpointStatus.RUNNING:
        raise EndpointError(f"Endpoint {name} is already running.")
    if status is EndpointStatus.UNKNOWN:
        raise EndpointError(
            f"A valid endpoint named {name} does not exist in {home}; "
            "`relay-sidecar-endpoint list` shows the endpoints there."
        )
    config = read_config(os.path.join(home, name))
    daemon = daemon_status(socket_path, wait)
    if uuid.UUID(config.uuid) != daemon.uuid:
        raise IdentityMismatchError(
            f"endpoint {name} has uuid {config.uuid}, but the relay-sidecar daemon "
            f"at {resolve(socket_path)} is {daemon.uuid}: an endpoint on the daemon "
            "must be the daemon's peer identity, or EndpointConnector would not "
            "accept it. Configure one for this daemon with `relay-sidecar-endpoint "
            f"configure NAME`, or start {name} with `proxystore-endpoint start {name}`."
        )
    if daemon.state is ConnectionState.FAILED:
        hint = (
            " (4004: another client registered the daemon's uuid, such as "
            "`proxystore-endpoint start` with this config)"
            if daemon.close_code == 4004
            else ""
        )
        raise EndpointError(
            f"the relay-sidecar daemon's relay connection has failed: "
            f"{daemon.detail or 'no detail'}{hint}; it retries after "
            "`relayctl reconnect` once the cause is fixed"
        )
    if daemon.state not in (ConnectionState.REGISTERED, ConnectionState.IDLE):
        logger.warning(
            f"the relay-sidecar daemon is not registered with {daemon.relay_url} yet "
            f"({daemon.state.name}{': ' + daemon.detail if daemon.detail else ''}); "
            "the endpoint serves once it is"
        )
    if config.relay.address != daemon.relay_url:
        logger.warning(
            f"endpoint {name}'s relay address is {config.relay.address}, but it peers "
            f"through the daemon, which is registered with {daemon.relay_url}"
        )
    if config.relay.auth.method is not None:
        logger.warning(
            f"endpoint {name}'s relay auth ({config.relay.auth.method}) is not used: "
            "the daemon authenticates to the relay"
        )
    _warn_displacement(config)
    return config


def _warn_displacement(config: EndpointConfig) -> None:
    """Warns that ProxyStore's own ``start`` would take the daemon's identity."""
    if config.relay.address is None:
        return
    logger.warning(
        f"Start endpoint {config.name} only with relay-sidecar-endpoint: "
        f"its config holds the daemon's uuid ({config.uuid}) and relay "
        f"({config.relay.address}), so `proxystore-endpoint start {config.name}` would "
        "register that uuid itself and displace the daemon from the relay (close "
        "code 4004), cutting off every process on this host that uses it."
    )


def _resolve_host(config: EndpointConfig, endpoint_dir: str) -> str:
    """The address the endpoint publishes, as ProxyStore's ``start`` finds it."""
    kind = getattr(config, "host_type", "ip")
    if kind == "fqdn":
        return socket.getfqdn()
    if kind == "ip":
        return socket.gethostbyname(proxystore_utils.hostname())
    if config.host is None:
        raise EndpointError(
            "the config's host_type is static but it sets no host: set `host`, or "
            f'set host_type to "ip" or "fqdn", in {Path(endpoint_dir, "config.toml")}'
        )
    return config.host


def _remove_stale_pid_file(name: str, home: str, config: EndpointConfig, hostname: str) -> None:
    """Clears the pid file of an endpoint whose process is gone, unless the
    endpoint last ran on another host (ProxyStore's rule)."""
    pid_file = get_pid_filepath(os.path.join(home, name))
    if config.host is not None and config.host != hostname:
        raise EndpointError(
            f"A PID file exists for endpoint {name}, but its config says it runs on "
            f"{config.host}. Stop it there; otherwise delete {pid_file} and try again."
        )
    logger.debug(f"Removing the stale PID file {pid_file}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(pid_file)


@contextlib.contextmanager
def _pid_file(path: str, name: str) -> Iterator[None]:
    """This process's pid in ``path`` while serving, as ProxyStore's ``stop``
    and ``list`` expect. Created exclusively, so two starts of one endpoint
    cannot both believe they own it; removed only while it is still ours."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise EndpointError(f"Endpoint {name} is already running or starting ({path}).") from None
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                ours = int(f.read().strip()) == os.getpid()
            if ours:
                os.remove(path)


def _start_detached(
    name: str,
    endpoint_dir: str,
    config: EndpointConfig,
    socket_path: Optional[PathLike],
    timeout: float,
    log_level: str,
) -> None:
    """Runs ``start NAME --no-detach`` in a new session and waits until it
    serves its uuid, exits, or ``timeout`` passes (then it is stopped)."""
    log_file = get_log_filepath(endpoint_dir)
    os.makedirs(endpoint_dir, exist_ok=True)
    offset = os.path.getsize(log_file) if os.path.exists(log_file) else 0
    command = [
        sys.executable,
        "-m",
        "relay_sidecar.endpoint",
        "--log-level",
        log_level,
        "start",
        name,
        "--no-detach",
        "--timeout",
        str(timeout),
        "--socket",
        os.path.abspath(resolve(socket_path)),
    ]
    logger.info("Starting endpoint process as daemon.")
    logger.info(f"Logs will be written to {log_file}")
    # Its output is its log, including what comes before logging is set up
    # (an import error, say).
    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            command,
            cwd=endpoint_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    address = f"http://{_resolve_host(config, endpoint_dir)}:{config.port}"
    deadline = time.monotonic() + timeout
    while True:
        code = child.poll()
        if code is not None:
            raise EndpointError(
                f"endpoint {name} did not start (exit code {code}); its log says:\n"
                + _log_since(log_file, offset)
            )
        if _serves(address, config.uuid):
            logger.info(f"Endpoint {name} <{config.uuid}> is serving on {address}.")
            return
        if time.monotonic() > deadline:
            _end(child)
            raise EndpointError(
                f"endpoint {name} was not serving on {address} after {timeout:g}s, so it "
                "was stopped (a longer --timeout lets it wait for the daemon's "
                "registration); its log says:\n" + _log_since(log_file, offset)
            )
        time.sleep(POLL_INTERVAL)


def _serves(address: str, endpoint_uuid: str) -> bool:
    """Whether an endpoint with ``endpoint_uuid`` answers at ``address``."""
    try:
        with _DIRECT.open(f"{address}/endpoint", timeout=PROBE_TIMEOUT) as response:
            return uuid.UUID(json.load(response)["uuid"]) == uuid.UUID(endpoint_uuid)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _end(child: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after ``STOP_GRACE``."""
    child.terminate()
    try:
        child.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _log_since(path: str, offset: int) -> str:
    """The last lines written to ``path`` after ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    lines: List[str] = text.splitlines()[-FAILURE_LOG_LINES:]
    return "\n".join(f"  {line}" for line in lines) or "  (nothing)"


def _free_port() -> int:
    """A port in ProxyStore's range that nothing listens on now."""
    for _ in range(PORT_TRIES):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
        return port
    raise EndpointError(f"no free port found in {PORT_RANGE[0]}-{PORT_RANGE[1]}; pass --port")
