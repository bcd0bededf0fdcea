"""Serves a ProxyStore endpoint in this process, peering through the daemon.

ProxyStore's ``serve()`` builds its own ``RelayClient`` and offers no way to
choose another, but its ``Endpoint`` takes a ``PeerManager``, and its
``create_app`` turns any ``Endpoint`` into the endpoint's HTTP app. So this
module composes those pieces, unchanged, around the daemon's relay client
(``exclusive.claim``), the way ``proxystore.endpoint.serve`` composes them
around its own: storage from the config, a ``PeerManager`` with the config's
channels (and ICE servers, from 1.1), the endpoint, the app under uvicorn.
Nothing of ProxyStore's is patched. The relay address and auth in the config
are not used: the daemon holds the relay connection and its credentials.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from typing import Any, Dict, Optional

import uvicorn
from aiortc import RTCIceServer
from proxystore.endpoint.config import EndpointConfig
from proxystore.endpoint.endpoint import Endpoint
from proxystore.endpoint.serve import create_app
from proxystore.endpoint.storage import DictStorage, SQLiteStorage

from .._socket import PathLike
from ..proxystore import PeerManager
from . import compat
from .errors import IdentityMismatchError
from .exclusive import claim

__all__ = ["serve"]

logger = logging.getLogger(__name__)

#: The log line format of ProxyStore's own endpoints, so that both kinds of
#: endpoint log read alike.
LOG_FORMAT = "[%(asctime)s.%(msecs)03d] %(levelname)-5s (%(name)s) :: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def serve(
    config: EndpointConfig,
    socket_path: Optional[PathLike],
    *,
    version: compat.Version,
    log_level: str = "INFO",
    log_file: Optional[str] = None,
) -> None:
    """Serves the endpoint until SIGINT or SIGTERM; returns once it is closed.

    Raises:
        IdentityMismatchError: The daemon's uuid is not ``config.uuid``.
        EndpointAlreadyRunningError: Another endpoint holds the daemon.
        SystemExit: uvicorn could not serve (the port is taken, say).
    """
    root = logging.getLogger()
    if log_file is not None and not _is_stdio(log_file):
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        root.addHandler(logging.FileHandler(log_file))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATE_FORMAT))
    root.setLevel(log_level)

    # uvicorn handles SIGINT and SIGTERM while it serves, then raises the
    # signal again once it has shut down. SIGINT then ends asyncio.run with
    # KeyboardInterrupt, after the endpoint has closed; SIGTERM's default
    # would kill the process there, before the caller's clean-up.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        asyncio.run(_serve(config, socket_path, version))
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("Finished serving endpoint: %s", config.name)


def _is_stdio(path: str) -> bool:
    """Whether stdout or stderr already writes to ``path`` (as they do for a
    detached endpoint), so that a file handler would log every line twice."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            opened = os.fstat(stream.fileno())
        except (AttributeError, OSError, ValueError):
            continue
        if (opened.st_dev, opened.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


async def _serve(
    config: EndpointConfig, socket_path: Optional[PathLike], version: compat.Version
) -> None:
    if config.host is None:
        raise ValueError("the endpoint config has no host")
    configured = uuid.UUID(config.uuid)

    relay_client = await claim(socket_path)
    if relay_client.uuid != configured:
        await relay_client.close()
        raise IdentityMismatchError(
            f"the relay-sidecar daemon's uuid is {relay_client.uuid}, not the "
            f"endpoint's {configured}"
        )
    peer_manager = PeerManager(
        relay_client,  # type: ignore[arg-type]  # RelayClient's interface
        peer_channels=config.relay.peer_channels,
        **_peer_manager_options(config, version),
    )
    endpoint = await Endpoint(peer_manager=peer_manager, storage=_storage(config))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(endpoint),
            host=config.host,
            port=config.port,
            log_config=None,
            access_log=False,
        )
    )
    logger.info(
        "Serving endpoint %s (%s) on %s:%s, peering through relay-sidecar as %s",
        configured,
        config.name,
        config.host,
        config.port,
        relay_client.name,
    )
    # create_app's shutdown hook closes the endpoint when uvicorn stops, a
    # taken port included (closing it here too would close it twice, which
    # ProxyStore before 1.1 does not expect).
    await server.serve()


def _storage(config: EndpointConfig) -> Any:
    """The storage the config asks for, as ProxyStore's ``serve`` picks it."""
    path = config.storage.database_path
    if path is None:
        logger.warning("Database path not provided. Data will not be persisted")
        return DictStorage(max_object_size=config.storage.max_object_size)
    logger.info("Using SQLite database for storage (path: %s)", path)
    return SQLiteStorage(path, max_object_size=config.storage.max_object_size)


def _peer_manager_options(config: EndpointConfig, version: compat.Version) -> Dict[str, Any]:
    """``ice_servers`` from the config, where this ProxyStore has them."""
    if not compat.has_ice_servers(version) or config.relay.ice_servers is None:
        return {}
    return {
        "ice_servers": [
            RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in config.relay.ice_servers
        ]
    }
