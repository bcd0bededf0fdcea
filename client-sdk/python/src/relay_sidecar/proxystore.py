"""ProxyStore on relay-sidecar: a drop-in for ProxyStore's relay client, and
a thin ``PeerManager`` that keeps the daemon's conversation rule.

Two changed imports move a ProxyStore peer manager onto the host's shared
relay registration; nothing else in ProxyStore changes::

    from relay_sidecar.proxystore import PeerManager, SidecarRelayClient

    manager = await PeerManager(SidecarRelayClient("wss://relay.example.org"))

Every client in every process on the host is the same peer (the daemon's
uuid and name). A remote ProxyStore peer keys its side of a connection by
the pair of uuids, so the daemon lets one local worker at a time hold the
*conversation* with a remote peer (see the contract's "Conversations"):

- Each ``SidecarRelayClient`` is a worker with a conversation subscription.
  Its offer to peer P claims P; an offer from P that nobody holds reaches
  exactly one client on the host, which then holds P.
- While another client holds P, this client's offer to P gets ProxyStore's
  own answer for an unreachable peer: the offer "comes back" with an error,
  and ``PeerManager.send`` raises ``PeerConnectionError`` at once.
- ``PeerManager`` (this module's) renews each conversation while its peer
  connection is open, and releases it when the connection closes, so that
  another worker may then connect. Under ProxyStore's own ``PeerManager``
  the client cannot see connections close, so it keeps each conversation
  until ``close()``: safe, but other workers wait longer.

This is the only module of the package that imports ProxyStore
(``pip install 'relay-sidecar[proxystore]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import urllib.parse
import uuid
import weakref
from types import TracebackType
from typing import Any, Dict, Iterable, Optional, Set, Type

try:
    import websockets.exceptions
    from websockets.frames import Close, CloseCode
    from proxystore.p2p.manager import PeerManager as _ProxyStorePeerManager
    from proxystore.p2p.relay.exceptions import (
        RelayClientError,
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
from ._socket import PathLike, resolve
from ._types import ConnectionState, PeerMessage, Status
from .client import Client
from .errors import (
    AbortedError,
    AlreadyExistsError,
    ConnectError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    RelaySidecarError,
    ResourceExhaustedError,
    UnavailableError,
    UnconfirmedError,
)

__all__ = [
    "DEFAULT_GROUP",
    "DaemonUnreachableError",
    "GroupHeldError",
    "IdentityMismatchError",
    "MessageRefusedError",
    "PeerManager",
    "RelayFailedError",
    "SidecarRelayClient",
    "SidecarRelayError",
]

logger = logging.getLogger(__name__)

#: The group every ``SidecarRelayClient`` joins unless told otherwise. With
#: conversation subscriptions a group does not change delivery; it matters
#: only for ``exclusive``.
DEFAULT_GROUP = "proxystore"

#: How long the pump waits before opening the subscription again after the
#: daemon went away, doubling up to the cap (seconds).
_RESUBSCRIBE_BACKOFF = (0.1, 5.0)
#: How long ``send`` waits between attempts while the daemon is not
#: registered with the relay or not reachable, doubling up to the cap
#: (seconds). ProxyStore's own client retries from 1 s to 60 s; the daemon
#: waits for registration itself within each attempt, so this only spaces
#: out attempts that failed at once.
_SEND_RETRY = (0.1, 5.0)
#: Renew conversations this often, as a fraction of their time-to-live.
_RENEW_FRACTION = 1 / 3
#: The time-to-live assumed until the daemon has said (its default), seconds.
_DEFAULT_CONVERSATION_TTL = 60.0
#: Messages read from the daemon ahead of ``recv()``. Past this the client
#: stops reading, and the daemon's own queue (and drop counting) takes over.
_INBOX_SIZE = 256


class SidecarRelayError(RelayClientError):
    """A failure from the daemon, as ProxyStore's relay client error.

    Attributes:
        cause: The ``relay_sidecar`` error (also ``__cause__``).
    """

    def __init__(self, message: str, cause: Optional[RelaySidecarError] = None) -> None:
        super().__init__(message)
        self.cause = cause


class DaemonUnreachableError(RelayNotConnectedError, ConnectError):
    """No relay-sidecar daemon answers on the socket (ProxyStore's
    ``RelayNotConnectedError``, and ``relay_sidecar.ConnectError``)."""


class IdentityMismatchError(RelayRegistrationError, ValueError):
    """What the caller asked for (``address``, ``client_uuid``) is not what
    the daemon is: this client would be someone else than asked. The message
    names the argument."""


class RelayFailedError(RelayRegistrationError, FailedPreconditionError):
    """The daemon's relay connection is FAILED (refused registration, 4001,
    4002, 4004): what ProxyStore's client raises for an unrecoverable close.
    ``relayctl reconnect`` once the cause is fixed."""


class GroupHeldError(RelayRegistrationError, AlreadyExistsError):
    """``exclusive`` and another client on the host holds (or shares) the
    group."""


class MessageRefusedError(RelayMessageEncodeError, InvalidArgumentError):
    """The daemon refused a malformed or oversized message; nothing was sent.
    The message names the field."""


def _normalized(url: str) -> str:
    """A relay URL in one spelling: scheme and host in lower case, the
    default port made explicit, no trailing slash."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or {"ws": 80, "wss": 443}.get(scheme)
    host = (parts.hostname or "").lower()
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}:{port}{path}{query}"


class _Session:
    """One connection to the daemon: a conversation subscription read into
    ``inbox`` by ``pump``, and the renewal of held conversations."""

    def __init__(self, client: aio.Client) -> None:
        self.client = client
        self.subscription: Optional[aio.Subscription] = None
        self.inbox: asyncio.Queue = asyncio.Queue(_INBOX_SIZE)
        self.tasks: Set[asyncio.Task] = set()
        self.closed = False


_CLOSED = object()


class SidecarRelayClient:
    """ProxyStore's ``RelayClient``, backed by the relay-sidecar daemon.

    Takes ``RelayClient``'s arguments, so that it replaces it where one is
    made; the daemon holds the host's one relay registration, so this
    client neither opens a WebSocket nor registers, and what concerns the
    relay connection comes from the daemon's configuration.

    Its ``uuid`` and ``name`` are the daemon's. The constructor asks the
    daemon for them (one local call of a few milliseconds), so they can be
    read at once, as with ProxyStore's client; if no daemon answers yet,
    they are asked for again when first read (``client_uuid``/``client_name``
    stand in meanwhile when given).

    Args:
        address: The relay's address, checked against the daemon's: a
            different relay raises ``IdentityMismatchError`` naming
            ``address``. ``None``: whatever relay the daemon uses. Must start
            with ``ws://`` or ``wss://`` (``ValueError`` otherwise, as
            ProxyStore's).
        client_name: Checked against the daemon's name; a difference is
            logged (peers see the daemon's).
        client_uuid: Checked against the daemon's uuid; a difference raises
            ``IdentityMismatchError`` naming ``client_uuid``.
        extra_headers: Accepted for ProxyStore's signature; the daemon's
            ``headers``/``token_file`` settings are what the relay sees.
        reconnect_task: Accepted for ProxyStore's signature; this client
            always follows the daemon back after it restarts.
        ssl_context: Accepted for ProxyStore's signature (the daemon's
            ``ca_file`` applies).
        timeout: Seconds for each call to the daemon that waits for the
            relay (``connect()`` warns after this long; each attempt of a
            ``send`` during a relay outage lasts this long).
        verify_certificate: Accepted for ProxyStore's signature (the
            daemon's ``insecure_skip_verify`` applies).
        socket_path: The daemon's Unix socket; ``None`` for
            ``relay_sidecar.default_socket_path()`` (``$RELAY_SIDECAR_SOCKET``,
            then the daemon's default).
        group: The daemon's delivery group; only matters with ``exclusive``
            (conversations are host-wide).
        worker: This client's worker label: who holds its conversations.
            Default: unique per instance.
        exclusive: Hold ``group`` alone while connected: a second client in
            the same group anywhere on the host is refused with
            ``GroupHeldError`` at ``connect()``. For a service that must run
            once per host.

    Raises:
        ValueError: ``address`` does not start with ``ws://`` or ``wss://``.
        IdentityMismatchError: The daemon answered, and is registered with
            another relay than ``address``, or under another uuid than
            ``client_uuid``.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        *,
        client_name: Optional[str] = None,
        client_uuid: Optional[uuid.UUID] = None,
        extra_headers: Optional[Dict[str, str]] = None,
        reconnect_task: bool = True,
        ssl_context: Optional[ssl.SSLContext] = None,
        timeout: float = 10,
        verify_certificate: bool = True,
        socket_path: Optional[PathLike] = None,
        group: Optional[str] = DEFAULT_GROUP,
        worker: Optional[str] = None,
        exclusive: bool = False,
    ) -> None:
        if address is not None and not (
            address.startswith("ws://") or address.startswith("wss://")
        ):
            raise ValueError(
                f"Relay server address must start with ws:// or wss://. Got {address}."
                + (
                    " (The daemon's socket goes in socket_path=.)"
                    if "/" in address and "://" not in address
                    else ""
                )
            )
        del extra_headers, reconnect_task, ssl_context, verify_certificate
        self._address = address
        self._given_name = client_name
        self._given_uuid = client_uuid
        self._timeout = timeout
        self._socket_path = resolve(socket_path)
        self._group = group
        self._exclusive = exclusive
        self.worker = worker or f"proxystore-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._uuid: Optional[uuid.UUID] = client_uuid
        self._name: Optional[str] = client_name
        self._checked = False
        self._session: Optional[_Session] = None
        self._connect_lock: Optional[asyncio.Lock] = None
        #: Peers whose conversation this client holds, and since when
        #: (monotonic seconds): its claims and what the daemon handed it.
        self._held: Dict[uuid.UUID, float] = {}
        self._ttl = _DEFAULT_CONVERSATION_TTL
        self._manager: Optional[weakref.ReferenceType] = None
        try:
            self._learn_identity()
        except (ConnectError, UnavailableError) as e:
            logger.debug("relay-sidecar not reachable yet (%s); identity deferred", e)

    def __repr__(self) -> str:
        return (
            f"SidecarRelayClient(uuid={self._uuid}, name={self._name!r}, "
            f"socket_path={self._socket_path!r}, worker={self.worker!r})"
        )

    # ----------------------------------------------------------------- identity

    def _learn_identity(self) -> None:
        """Asks the daemon (blocking, briefly) who it is, and checks it."""
        with Client(self._socket_path) as client:
            self._adopt(client.status(timeout=self._timeout))

    def _adopt(self, status: Status) -> None:
        """Takes the daemon's identity, refusing what contradicts the
        caller's arguments."""
        if self._address is not None and _normalized(self._address) != _normalized(
            status.relay_url
        ):
            raise IdentityMismatchError(
                f"address: {self._address!r} is not the relay of the relay-sidecar daemon "
                f"at {self._socket_path} ({status.relay_url!r}); pass the daemon's relay, "
                "or address=None for whatever it uses"
            )
        if self._given_uuid is not None and self._given_uuid != status.uuid:
            raise IdentityMismatchError(
                f"client_uuid: {self._given_uuid} is not the uuid of the relay-sidecar daemon "
                f"at {self._socket_path} ({status.uuid}); every client on this host is the "
                "daemon's one identity: leave client_uuid unset, or set the daemon's `uuid`"
            )
        if self._given_name is not None and self._given_name != status.name and not self._checked:
            logger.warning(
                "client_name %r differs from relay-sidecar's name %r, which peers see",
                self._given_name,
                status.name,
            )
        if self._checked and self._uuid is not None and status.uuid != self._uuid:
            logger.error("relay-sidecar's identity changed from %s to %s", self._uuid, status.uuid)
        self._uuid, self._name = status.uuid, status.name
        self._checked = True

    def _identity(self, known: Optional[object]) -> None:
        """Asks the daemon unless asked already; without an answer, what the
        caller gave (``known``) stands in."""
        if self._checked:
            return
        try:
            self._learn_identity()
        except (ConnectError, UnavailableError) as e:
            if known is None:
                raise RelayNotConnectedError(
                    f"the uuid and name are the relay-sidecar daemon's, and none answers at "
                    f"{self._socket_path}: {e}"
                ) from e

    @property
    def name(self) -> str:
        """The host's peer name on the relay (the daemon's)."""
        self._identity(self._name)
        assert self._name is not None
        return self._name

    @property
    def uuid(self) -> uuid.UUID:
        """The host's peer uuid on the relay (the daemon's)."""
        self._identity(self._uuid)
        assert self._uuid is not None
        return self._uuid

    # --------------------------------------------------------------- lifecycle

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

        A no-op when already connected. As ProxyStore's client does with the
        relay, with ``retry`` this waits for the daemon (retrying from 1 s,
        doubling to 60 s) and for its relay connection, warning after
        ``timeout`` seconds; without, it fails after ``timeout``.

        Raises:
            DaemonUnreachableError: Without ``retry``, no daemon answers.
            RelayRegistrationError: Without ``retry``, not registered within
                ``timeout``.
            RelayFailedError: The daemon's relay connection is FAILED.
            IdentityMismatchError: The daemon is not what the constructor was
                told (``address``, ``client_uuid``).
            GroupHeldError: ``exclusive``, and the group is taken.
        """
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._session is not None:
                return
            backoff = 1.0
            while True:
                try:
                    session = await self._open()
                except (ConnectError, UnavailableError) as e:
                    if not retry:
                        raise DaemonUnreachableError(self._socket_path, _os_error(e)) from e
                    logger.warning(
                        "relay-sidecar at %s is not reachable (%s); retrying in %gs",
                        self._socket_path,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 60)
                    continue
                try:
                    await self._wait_registered(session, retry)
                except BaseException:
                    await self._shut(session)
                    raise
                self._session = session
                self._start(session)
                return

    async def _open(self) -> _Session:
        """A session: the identity checked and the subscription open."""
        client = aio.Client(self._socket_path, worker=self.worker)
        session = _Session(client)
        try:
            self._adopt(await client.status(timeout=self._timeout))
            session.subscription = await self._subscribe(client)
        except BaseException:
            await client.close()
            raise
        return session

    async def _subscribe(self, client: aio.Client) -> aio.Subscription:
        try:
            return await client.subscribe(
                self._group or None, exclusive=self._exclusive, conversations=True
            )
        except AlreadyExistsError as e:
            raise GroupHeldError(e.message) from e

    def _start(self, session: _Session) -> None:
        for work in (self._pump(session), self._renew(session)):
            task = asyncio.ensure_future(work)
            session.tasks.add(task)
        if self._manager is None:
            logger.info(
                "%r is not under relay_sidecar.proxystore.PeerManager, which cannot see peer "
                "connections close: it keeps each conversation until close()",
                self,
            )

    async def close(self) -> None:
        """Releases this client's conversations, ends its subscription and its
        connection to the daemon (never the daemon's relay connection, which
        other processes share). A pending ``recv()`` raises websockets'
        ``ConnectionClosedOK``, which ends a running ``PeerManager``'s loop as
        ProxyStore's own client does. Using the client again connects again.
        """
        session, self._session = self._session, None
        if session is None:
            return
        held, self._held = list(self._held), {}
        for peer in held:
            try:
                await session.client.release_conversation(peer, timeout=self._timeout)
            except RelaySidecarError as e:
                logger.debug("releasing %s on close: %s", peer, e)
        await self._shut(session)

    async def _shut(self, session: _Session) -> None:
        session.closed = True
        for task in session.tasks:
            task.cancel()
        await asyncio.gather(*session.tasks, return_exceptions=True)
        if session.subscription is not None:
            session.subscription.cancel()
        await session.client.close()
        # Wake whoever waits in recv(): the queue is empty if anyone does.
        while not session.inbox.empty():
            session.inbox.get_nowait()
        session.inbox.put_nowait(_CLOSED)

    # --------------------------------------------------------------- messages

    async def send(self, message: RelayMessage) -> None:
        """Sends a ``PeerConnectionRequest`` through the daemon, as this
        worker's part of the conversation with ``message.peer_uuid``.

        The daemon fills in ``source_uuid`` and ``source_name`` (the message's
        own are ignored) and the message's ``error`` is not sent. When
        another worker on the host holds the conversation with the peer, the
        message is not sent and comes back from ``recv()`` with ``error``
        set, as ProxyStore's relay returns a message for a peer it cannot
        reach: a ``PeerManager``'s connection attempt then fails at once with
        ``PeerConnectionError``. While the daemon is not registered with the
        relay (or not reachable), this waits and tries again, as ProxyStore's
        client waits for the relay.

        Raises:
            RelayMessageEncodeError: ``message`` is not a
                ``PeerConnectionRequest`` (registration is the daemon's
                business); ``MessageRefusedError``, a subclass, when the
                daemon refused a field (the message names it).
            RelayFailedError: The daemon's relay connection is FAILED.
            websockets.exceptions.ConnectionClosedOK: ``close()`` was called
                while this waited.
        """
        if not isinstance(message, PeerConnectionRequest):
            raise RelayMessageEncodeError(
                "SidecarRelayClient sends only PeerConnectionRequest messages, "
                f"not {type(message).__name__}"
            )
        if self._session is None:
            await self.connect()
        peer = message.peer_uuid
        retry = _SEND_RETRY[0]
        warned = False
        while True:
            session = self._session
            if session is None:
                raise _closed()
            try:
                await session.client.send(
                    peer,
                    message.description_type,
                    message.description,
                    conversation=True,
                    timeout=self._timeout,
                )
            except (AbortedError, ResourceExhaustedError) as e:
                # Not ours to talk to now: what ProxyStore's relay does for a
                # peer it cannot reach.
                logger.info("not sending to %s: %s", peer, e.message)
                await session.inbox.put(_returned(message, self, e.message))
                return
            except UnavailableError as e:
                if not warned:
                    logger.warning("relay-sidecar cannot send yet (%s); waiting", e.message)
                    warned = True
                await asyncio.sleep(retry)
                retry = min(retry * 2, _SEND_RETRY[1])
                continue
            except UnconfirmedError as e:
                # Written, unconfirmed: ProxyStore's client would not know
                # either. A lost offer times out like any other.
                logger.warning("relay-sidecar could not confirm a message to %s: %s", peer, e)
            except FailedPreconditionError as e:
                raise RelayFailedError(e.message) from e
            except InvalidArgumentError as e:
                raise MessageRefusedError(e.message) from e
            except PermissionDeniedError as e:
                raise RelayRegistrationError(str(e)) from e
            except RelaySidecarError as e:
                raise SidecarRelayError(str(e), e) from e
            self._held.setdefault(peer, time.monotonic())
            return

    async def recv(self) -> RelayMessage:
        """The next ``PeerConnectionRequest`` of this client's conversations.

        A relay bounce of one of this client's sends (or a send another
        worker's conversation stopped) comes back as the message that was
        sent (``source_uuid`` is this host) with ``error`` set. If the daemon
        goes away, this waits for it to come back and subscribes again.

        Raises:
            websockets.exceptions.ConnectionClosedOK: ``close()`` was called
                while waiting (this ends a ``PeerManager``'s loop cleanly).
        """
        if self._session is None:
            await self.connect()
        session = self._session
        if session is None:
            raise _closed()
        item = await session.inbox.get()
        if item is _CLOSED:
            session.inbox.put_nowait(_CLOSED)
            raise _closed()
        message: PeerConnectionRequest = item
        remote = message.peer_uuid if message.source_uuid == self._uuid else message.source_uuid
        if message.error is None:
            self._held.setdefault(remote, time.monotonic())
        else:
            # The daemon has ended the conversation (the peer is gone, or
            # refused), or never gave it.
            self._held.pop(remote, None)
        return message

    async def _pump(self, session: _Session) -> None:
        """Reads the subscription into the inbox; subscribes again when the
        daemon went away and is back."""
        backoff = _RESUBSCRIBE_BACKOFF[0]
        while not session.closed:
            try:
                if session.subscription is None:
                    self._adopt(await session.client.status(timeout=self._timeout))
                    session.subscription = await self._subscribe(session.client)
                    logger.info("relay-sidecar subscription open again")
                async for message in session.subscription:
                    backoff = _RESUBSCRIBE_BACKOFF[0]
                    await session.inbox.put(_to_proxystore(message))
                reason: Any = "the daemon stopped"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever it was, try again
                reason = e
            if session.closed:
                return
            session.subscription = None
            logger.warning(
                "relay-sidecar subscription lost (%s); subscribing again in %.1fs",
                reason,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESUBSCRIBE_BACKOFF[1])

    # ----------------------------------------------------------- conversations

    def _attach(self, manager: PeerManager) -> None:
        """Called by this module's ``PeerManager``: conversations are then
        renewed while the manager has a connection to the peer, and released
        when it closes one."""
        self._manager = weakref.ref(manager)

    def _manager_peers(self) -> Optional[Set[uuid.UUID]]:
        """The remote peers the attached manager has connections with, or
        ``None`` without a manager."""
        manager = self._manager() if self._manager is not None else None
        if manager is None:
            return None
        return {peer for key in list(manager._peers) for peer in key if peer != self._uuid}

    async def _renew(self, session: _Session) -> None:
        """Keeps this client's conversations while their connections are up:
        a WebRTC connection carries no relay traffic once established, and
        the daemon ends a silent conversation after its time-to-live."""
        while not session.closed:
            # At least a second apart, whatever time-to-live a daemon reports.
            await asyncio.sleep(max(self._ttl * _RENEW_FRACTION, 1.0))
            open_peers = self._manager_peers()
            now = time.monotonic()
            for peer, since in list(self._held.items()):
                if open_peers is not None and peer not in open_peers:
                    # Handed over but no connection made of it: let it lapse.
                    if now - since > self._ttl:
                        self._held.pop(peer, None)
                    continue
                try:
                    self._ttl = await session.client.hold_conversation(
                        peer, timeout=self._timeout
                    )
                except AbortedError as e:
                    logger.warning("lost the conversation with %s: %s", peer, e.message)
                    self._held.pop(peer, None)
                    await self._lost(peer)
                except RelaySidecarError as e:
                    # The daemon is away or this subscription is being
                    # renewed: try again next round.
                    logger.debug("renewing the conversation with %s: %s", peer, e)

    async def _lost(self, peer: uuid.UUID) -> None:
        """Another worker has the conversation now: this one's connection
        to the peer must not go on pretending."""
        manager = self._manager() if self._manager is not None else None
        if manager is not None:
            await manager.close_connection((manager.uuid, peer))

    async def release(self, peer: uuid.UUID) -> None:
        """Ends this client's conversation with ``peer`` (if it holds it),
        so that another worker on the host, or the peer's next offer, may
        start one. ``PeerManager`` calls it when a connection closes."""
        session = self._session
        if self._held.pop(peer, None) is None or session is None:
            return
        try:
            await session.client.release_conversation(peer, timeout=self._timeout)
        except RelaySidecarError as e:
            logger.debug("releasing the conversation with %s: %s", peer, e)

    async def _wait_registered(self, session: _Session, retry: bool) -> None:
        statuses = await session.client.watch_status()
        waiting = asyncio.ensure_future(self._until_registered(statuses))
        try:
            done, _ = await asyncio.wait({waiting}, timeout=self._timeout)
            if not done:
                status = await session.client.status()
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
                raise RelayFailedError(
                    f"relay-sidecar's relay connection to {status.relay_url} has "
                    f"failed ({status.detail or 'no detail'}); it retries after "
                    "`relayctl reconnect` or a restart of the daemon"
                )
        raise RelayRegistrationError("relay-sidecar stopped before it registered")


class PeerManager(_ProxyStorePeerManager):
    """ProxyStore's ``PeerManager``, for a ``SidecarRelayClient``.

    The same class with two additions that sharing one identity needs:

    - It tells its client which peer connections are open, so that the
      client renews their conversations while they are (once a WebRTC
      connection is up the relay carries nothing, and the daemon ends a
      silent conversation), and releases a conversation when its
      connection closes, so that another worker on the host may connect to
      that peer.
    - A connection whose offer could not be sent is forgotten rather than
      left behind (ProxyStore keeps it, and every later send to that peer
      would wait on it until its timeout).

    With ProxyStore's own ``RelayClient`` it behaves as ProxyStore's.
    """

    def __init__(self, relay_client: Any, **kwargs: Any) -> None:
        super().__init__(relay_client, **kwargs)
        if isinstance(relay_client, SidecarRelayClient):
            relay_client._attach(self)

    async def close_connection(self, peers: Iterable[uuid.UUID]) -> None:
        peers = frozenset(peers)
        await super().close_connection(peers)
        client = self._relay_client
        if isinstance(client, SidecarRelayClient):
            for peer in peers:
                if peer != client._uuid:
                    await client.release(peer)

    async def get_connection(self, peer_uuid: uuid.UUID) -> Any:
        try:
            return await super().get_connection(peer_uuid)
        except BaseException:
            peers = frozenset({self.uuid, peer_uuid})
            async with self._peers_lock:
                connection = self._peers.pop(peers, None)
            if connection is not None:
                await connection.close()
            raise


def _closed() -> websockets.exceptions.ConnectionClosedOK:
    """What ProxyStore's relay client raises from a socket closed under it."""
    close = Close(CloseCode.NORMAL_CLOSURE, "SidecarRelayClient closed")
    return websockets.exceptions.ConnectionClosedOK(close, close, True)


def _os_error(e: RelaySidecarError) -> OSError:
    if isinstance(e, ConnectError):
        return e.cause
    return ConnectionRefusedError(str(e))


def _returned(
    message: PeerConnectionRequest, client: SidecarRelayClient, why: str
) -> PeerConnectionRequest:
    """``message`` as the relay returns one it cannot forward."""
    return PeerConnectionRequest(
        source_uuid=client.uuid,
        source_name=client.name,
        peer_uuid=message.peer_uuid,
        description_type=message.description_type,
        description=message.description,
        error=f"relay-sidecar: {why}",
    )


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

