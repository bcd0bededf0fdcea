"""A drop-in for ProxyStore's relay client that goes through relay-sidecar.

``SidecarRelayClient`` has the interface of
``proxystore.p2p.relay.client.RelayClient`` and speaks ProxyStore's own
message classes, so a ``PeerManager`` built on it establishes real peer
connections without a change to ProxyStore::

    from proxystore.p2p.manager import PeerManager
    from relay_sidecar.proxystore import SidecarRelayClient

    manager = await PeerManager(SidecarRelayClient())

Every client in every process on the host is the same peer (the daemon's
uuid and name). Each client is one *worker* in one shared delivery *group*,
so an offer from a new peer reaches exactly one local ``PeerManager``, and
the daemon routes a peer's replies to the worker that last wrote to it.

Because they share one identity, two local ``PeerManager``s must not open
peer connections to the *same* remote peer at once: the remote side keys its
connections by the pair of uuids and would take them for one.

This is the only module of the package that imports ProxyStore
(``pip install 'relay-sidecar[proxystore]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from types import TracebackType
from typing import Optional, Type

try:
    from proxystore.p2p.relay.exceptions import (
        RelayNotConnectedError,
        RelayRegistrationError,
    )
    from proxystore.p2p.relay.messages import (
        PeerConnectionRequest,
        RelayMessage,
        RelayMessageEncodeError,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"relay_sidecar.proxystore needs ProxyStore 0.6 or later ({e}); "
        "install it with: pip install 'proxystore[endpoints]'"
    ) from e

from . import aio
from ._socket import PathLike
from ._types import ConnectionState, PeerMessage
from .errors import UnavailableError

__all__ = ["DEFAULT_GROUP", "SidecarRelayClient"]

logger = logging.getLogger(__name__)

#: The delivery group every ``SidecarRelayClient`` joins unless told otherwise.
DEFAULT_GROUP = "proxystore"

#: How long ``recv()`` waits before opening the subscription again after the
#: daemon went away, doubling up to the cap.
_RESUBSCRIBE_BACKOFF = (0.1, 5.0)


class SidecarRelayClient:
    """ProxyStore's ``RelayClient`` interface, backed by the relay-sidecar daemon.

    The daemon holds the host's one relay registration; this client neither
    opens a WebSocket nor registers. Its ``uuid`` and ``name`` are the
    daemon's, known once ``connect()`` has run (``PeerManager`` runs it).

    Args:
        socket_path: The daemon's Unix socket; ``None`` for
            ``relay_sidecar.default_socket_path()``.
        group: The daemon's delivery group. Every ``SidecarRelayClient`` on
            the host should share one (the default), so that each message
            reaches one ``PeerManager`` and not all of them.
        worker: This client's worker label, which the daemon uses to route a
            peer's replies back here. Default: unique per instance.
        exclusive: Hold ``group`` alone while connected, so that a second
            client in the same group (on this host, in any process) is
            refused with ``relay_sidecar.AlreadyExistsError`` at ``connect()``:
            for a service that must run once per host.
        timeout: Seconds ``connect()`` waits for the daemon to be registered
            with the relay before it warns (or, with ``retry=False``, fails).
    """

    def __init__(
        self,
        socket_path: Optional[PathLike] = None,
        *,
        group: Optional[str] = DEFAULT_GROUP,
        worker: Optional[str] = None,
        exclusive: bool = False,
        timeout: float = 10,
    ) -> None:
        self._socket_path = socket_path
        self._group = group
        self._exclusive = exclusive
        self.worker = worker or f"proxystore-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._timeout = timeout
        self._uuid: Optional[uuid.UUID] = None
        self._name: Optional[str] = None
        self._client: Optional[aio.Client] = None
        self._subscription: Optional[aio.Subscription] = None
        self._connect_lock: Optional[asyncio.Lock] = None

    def __repr__(self) -> str:
        return (
            f"SidecarRelayClient(uuid={self._uuid}, name={self._name!r}, "
            f"group={self._group!r}, worker={self.worker!r})"
        )

    @property
    def name(self) -> str:
        """The host's peer name on the relay (the daemon's)."""
        if self._name is None:
            raise RelayNotConnectedError("the name is the daemon's: call connect() first")
        return self._name

    @property
    def uuid(self) -> uuid.UUID:
        """The host's peer uuid on the relay (the daemon's)."""
        if self._uuid is None:
            raise RelayNotConnectedError("the uuid is the daemon's: call connect() first")
        return self._uuid

    async def __aenter__(self) -> SidecarRelayClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def connect(self, retry: bool = True) -> None:
        """Subscribes to the daemon and waits until it is registered with the relay.

        A no-op when already connected. The daemon itself retries a lost
        relay connection, so this only waits: with ``retry`` (ProxyStore's
        meaning) as long as it takes, warning after ``timeout`` seconds;
        without, at most ``timeout`` seconds.

        Raises:
            relay_sidecar.ConnectError: No daemon listens on the socket.
            RelayRegistrationError: The daemon's relay connection is FAILED
                (``relayctl reconnect`` once the cause is fixed), or, without
                ``retry``, not registered within ``timeout``.
        """
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._subscription is not None:
                return
            try:
                await self._subscribe()
                await self._wait_registered(retry)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Ends the subscription and the connection to the daemon (never the
        daemon's relay connection, which other processes share)."""
        subscription, self._subscription = self._subscription, None
        client, self._client = self._client, None
        if subscription is not None:
            subscription.cancel()
        if client is not None:
            await client.close()

    async def send(self, message: RelayMessage) -> None:
        """Sends a ``PeerConnectionRequest`` through the daemon.

        The daemon fills in ``source_uuid`` and ``source_name`` (the message's
        own are ignored) and the message's ``error`` is not sent.

        Raises:
            RelayMessageEncodeError: ``message`` is not a ``PeerConnectionRequest``
                (registration is the daemon's business).
            relay_sidecar.RelaySidecarError: The daemon refused the message
                (``InvalidArgumentError``, ``UnavailableError``,
                ``FailedPreconditionError``) or could not confirm it
                (``UnconfirmedError``).
        """
        if not isinstance(message, PeerConnectionRequest):
            raise RelayMessageEncodeError(
                "SidecarRelayClient sends only PeerConnectionRequest messages, "
                f"not {type(message).__name__}"
            )
        if self._client is None:
            await self.connect()
        assert self._client is not None
        await self._client.send(
            message.peer_uuid,
            message.description_type,
            message.description,
            worker=self.worker,
        )

    async def recv(self) -> RelayMessage:
        """The next ``PeerConnectionRequest`` for this host.

        A relay bounce of one of this host's sends comes back as the message
        that was sent (``source_uuid`` is this host) with ``error`` set. If
        the daemon goes away, this waits for it to come back and subscribes
        again.

        Raises:
            RelayNotConnectedError: ``close()`` was called while waiting.
        """
        if self._client is None:
            await self.connect()
        backoff = _RESUBSCRIBE_BACKOFF[0]
        while True:
            client, subscription = self._client, self._subscription
            if client is None:
                raise RelayNotConnectedError("SidecarRelayClient was closed")
            try:
                if subscription is None:
                    await self._subscribe()
                    continue
                message = await subscription.__anext__()
            except (StopAsyncIteration, UnavailableError) as e:
                if self._client is not client:
                    raise RelayNotConnectedError("SidecarRelayClient was closed") from None
                if self._subscription is subscription:
                    self._subscription = None
                reason = "the daemon stopped" if isinstance(e, StopAsyncIteration) else e
                logger.warning(
                    "relay-sidecar subscription lost (%s); subscribing again in %.1fs",
                    reason,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RESUBSCRIBE_BACKOFF[1])
                continue
            return _to_proxystore(message)

    async def _subscribe(self) -> None:
        """Opens the client (if needed), learns the identity and subscribes."""
        if self._client is None:
            self._client = aio.Client(self._socket_path, worker=self.worker)
        status = await self._client.status()
        if self._uuid is not None and status.uuid != self._uuid:
            logger.error("relay-sidecar's identity changed from %s to %s", self._uuid, status.uuid)
        self._uuid, self._name = status.uuid, status.name
        self._subscription = await self._client.subscribe(
            self._group or None, exclusive=self._exclusive
        )

    async def _wait_registered(self, retry: bool) -> None:
        assert self._client is not None
        statuses = await self._client.watch_status()
        waiting = asyncio.ensure_future(self._until_registered(statuses))
        try:
            done, _ = await asyncio.wait({waiting}, timeout=self._timeout)
            if not done:
                status = await self._client.status()
                message = (
                    f"relay-sidecar is not registered with {status.relay_url} after "
                    f"{self._timeout:g}s: {status.state}"
                    + (f" ({status.detail})" if status.detail else "")
                )
                if not retry:
                    raise RelayRegistrationError(message)
                logger.warning("%s; still waiting", message)
            await waiting
        finally:
            waiting.cancel()
            statuses.cancel()

    @staticmethod
    async def _until_registered(statuses: aio.StatusStream) -> None:
        async for status in statuses:
            if status.state is ConnectionState.REGISTERED:
                return
            if status.state is ConnectionState.FAILED:
                raise RelayRegistrationError(
                    f"relay-sidecar's relay connection to {status.relay_url} has "
                    f"failed ({status.detail or 'no detail'}); it retries after "
                    "`relayctl reconnect` or a restart of the daemon"
                )
        raise RelayRegistrationError("relay-sidecar stopped before it registered")


def _to_proxystore(message: PeerMessage) -> PeerConnectionRequest:
    """ProxyStore's message for one the daemon delivered."""
    error = message.error
    if message.bounced and error is None:
        error = "the relay could not forward the message"
    return PeerConnectionRequest(
        source_uuid=message.source_uuid,
        source_name=message.source_name,
        peer_uuid=message.peer_uuid,
        description_type=message.description_type,  # type: ignore[arg-type]
        description=message.description,
        error=error,
    )
