"""The blocking ``Client`` and the streams it opens."""

from __future__ import annotations

import logging
import time
import uuid
from types import TracebackType
from typing import Any, Callable, Generic, Iterator, Optional, Type, TypeVar, Union

import grpc

from . import _convert
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2_grpc as pb_grpc
from ._socket import CHANNEL_OPTIONS, PathLike, find, target
from ._types import DescriptionType, PeerMessage, Status
from .errors import SubscriptionLostError, from_rpc_error

__all__ = ["Client", "RESUME_WITHIN", "StatusStream", "Subscription"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: How long a subscription waits, by default, for its daemon to come back
#: after it stopped: a restart (by systemd, which waits 2 s, or by a job
#: script) takes a few seconds, and a worker whose daemon is gone for good
#: learns it within half a minute.
RESUME_WITHIN = 30.0
#: Pauses between attempts to subscribe again (doubling, seconds): a local
#: socket answers at once when a daemon is there.
_RESUME_PAUSE = (0.05, 1.0)
#: Stream failures that mean the daemon went away, not that it refused.
_DAEMON_GONE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)


class _Refused(grpc.RpcError):
    """A call the daemon ended with a status before its first message."""

    def __init__(self, code: grpc.StatusCode, details: Optional[str]) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> Optional[str]:
        return self._details


class _Stream(Generic[T]):
    """A server stream from the daemon as an iterator of SDK values.

    Iteration ends when the daemon ends the stream (it is stopping) or after
    ``cancel()``; a failed stream raises the SDK's error.
    """

    def __init__(self, call: grpc.Call, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert
        self._cancelled = False

    def _started(self) -> None:
        """Waits until the daemon has accepted the call, so that nothing the
        daemon sends after this returns is missed; raises its refusal."""
        self._call.initial_metadata()
        if self._call.done() and self._call.code() != grpc.StatusCode.OK:
            raise from_rpc_error(self._call)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            try:
                item = next(self._call)
            except StopIteration:
                if self._cancelled:
                    raise
                self._gone("ended the stream", None)
                continue
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                if e.code() in _DAEMON_GONE and not self._cancelled:
                    self._gone(f"stopped ({e.details()})", e)
                    continue
                raise from_rpc_error(e) from None
            return self._convert(item)

    def _gone(self, why: str, error: Optional[grpc.RpcError]) -> None:
        """The daemon ended the stream or went away: here the stream ends."""
        if error is None:
            raise StopIteration
        raise from_rpc_error(error) from None

    def cancel(self) -> None:
        """Ends the stream; a pending or later ``next()`` stops iteration."""
        self._cancelled = True
        self._call.cancel()

    close = cancel

    def __enter__(self) -> _Stream[T]:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.cancel()


class _Resumer:
    """How a subscription subscribes again after its daemon stopped: the
    bounds, the checks and the messages, for the blocking and the asyncio
    ``Subscription`` alike (each makes the calls its own way)."""

    def __init__(
        self,
        client: Any,
        request: Any,
        identity: uuid.UUID,
        resume: float,
        deadline: Optional[float],
    ) -> None:
        self.client = client
        self.request = request
        self.socket_path = client.socket_path
        self.identity = identity
        self.resume = resume
        self.deadline = deadline
        self.resumed = 0
        self._what = ""
        self._last = ""
        self._until = 0.0
        self._pause = _RESUME_PAUSE[0]

    def past_deadline(self) -> bool:
        """Whether the subscription's own ``timeout`` is over (then it ends
        as any stream does)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def begin(self, why: str) -> None:
        """The daemon ``why`` (ended the stream, stopped): start waiting."""
        self._what = f"the daemon at {self.socket_path} {why}"
        if self.resume <= 0:
            raise SubscriptionLostError(f"{self._what} (not waited for)")
        logger.warning("relay-sidecar: %s; waiting up to %gs for it", self._what, self.resume)
        self._last, self._pause = why, _RESUME_PAUSE[0]
        self._until = time.monotonic() + self.resume

    def left(self) -> float:
        """Seconds left to wait; ``SubscriptionLostError`` when none."""
        left = self._until - time.monotonic()
        if left <= 0:
            raise SubscriptionLostError(
                f"{self._what}, and none answered again within {self.resume:g}s ({self._last})"
            )
        return left

    def failed(self, error: grpc.RpcError) -> float:
        """An attempt failed: the pause before the next one, or the SDK's
        error when the daemon refused rather than was absent."""
        if error.code() not in _DAEMON_GONE | {grpc.StatusCode.DEADLINE_EXCEEDED}:
            raise from_rpc_error(error) from None
        self._last = f"{error.code().name}: {error.details()}"
        pause = min(self._pause, max(self._until - time.monotonic(), 0))
        self._pause = min(self._pause * 2, _RESUME_PAUSE[1])
        return pause

    def same_peer(self, status: Any) -> None:
        """Refuses a daemon that came back as another peer."""
        now = uuid.UUID(status.uuid)
        if now != self.identity:
            raise SubscriptionLostError(
                f"the daemon came back as another peer ({now}, was {self.identity}); "
                "subscribe again to use it"
            )

    def call_timeout(self) -> Optional[float]:
        """The new call's timeout: what is left of the subscription's."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0)

    def done(self) -> None:
        self.resumed += 1
        logger.warning("relay-sidecar: subscription resumed on %s", self.socket_path)


class _Resuming:
    """What the blocking and the asyncio ``Subscription`` share."""

    _resumer: _Resumer

    @property
    def resumed(self) -> int:
        """How many times this subscription was opened again."""
        return self._resumer.resumed


class Subscription(_Resuming, _Stream[PeerMessage]):
    """Inbound messages and bounces from ``Client.subscribe()``: an iterator
    of ``PeerMessage`` and a context manager that cancels it.

    It outlives a restart of the daemon: when the daemon stops, iteration
    waits up to ``resume`` seconds for a daemon with the same identity to
    answer on the same socket and subscribes again (``resumed`` counts how
    often). Messages that reached the host while no daemon ran are not
    delivered (the relay bounced them to their senders). If none comes back
    in time, or one with another identity does, iteration raises
    ``SubscriptionLostError``.
    """

    def __init__(self, call: grpc.Call, resumer: _Resumer) -> None:
        super().__init__(call, _convert.peer_message)
        self._resumer = resumer

    def _gone(self, why: str, error: Optional[grpc.RpcError]) -> None:
        resumer = self._resumer
        if resumer.past_deadline():
            super()._gone(why, error)
        try:
            resumer.begin(why)
            while True:
                left = resumer.left()
                try:
                    self._call = self._reopen(left)
                except grpc.RpcError as e:
                    time.sleep(resumer.failed(e))
                    continue
                resumer.done()
                return
        except BaseException:
            self._cancelled = True
            raise

    def _reopen(self, within: float) -> grpc.Call:
        """A new call on a daemon that is the same peer; raises the
        ``grpc.RpcError`` that stopped it."""
        stub = self._resumer.client._stub
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=within, wait_for_ready=True)
        self._resumer.same_peer(status)
        timeout = self._resumer.call_timeout()
        call = stub.Subscribe(self._resumer.request, timeout=timeout, wait_for_ready=True)
        call.initial_metadata()
        if call.done() and call.code() != grpc.StatusCode.OK:
            raise _Refused(call.code(), call.details())
        return call


class StatusStream(_Stream[Status]):
    """Status updates from ``Client.watch_status()``: an iterator of
    ``Status`` and a context manager that cancels it."""


class Client:
    """A blocking connection to the relay-sidecar daemon.

    Every process that uses it sends and receives as the host's one peer
    identity. Safe to share between threads. If the daemon restarts, later
    calls reach the new one on the same socket path.

    Args:
        socket_path: The daemon's Unix socket; ``None``: by the shared rule,
            ``$RELAY_SIDECAR_SOCKET`` when set, else the first that answers
            of the user's own daemon's and the system service's (see
            ``default_socket_path()``).
        worker: A label sent with every send and subscribe made through this
            client. Replies from a peer go preferably to the subscription of
            the worker that last sent to it; without a label the calling
            process is the worker, so set one when several threads each send
            and subscribe.

    Raises:
        ConnectError: The socket is missing or no daemon listens on it.
    """

    def __init__(
        self, socket_path: Optional[PathLike] = None, *, worker: Optional[str] = None
    ) -> None:
        self.socket_path = find(socket_path)
        self.worker = worker
        self._channel = grpc.insecure_channel(target(self.socket_path), options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.RelaySidecarStub(self._channel)

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r}, worker={self.worker!r})"

    def close(self) -> None:
        """Closes the connection; open streams end."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def status(self, *, timeout: Optional[float] = None) -> Status:
        """The daemon's identity, connection state and counters."""
        try:
            response = self._stub.GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.status(response)

    def watch_status(self, *, timeout: Optional[float] = None) -> StatusStream:
        """A stream of statuses: the current one at once, then one at every
        change of the connection state, until it is cancelled, the daemon
        stops, or ``timeout`` seconds (a deadline for the whole stream) pass.
        """
        call = self._stub.WatchStatus(pb.WatchStatusRequest(), timeout=timeout)
        stream = StatusStream(call, _convert.status_update)
        stream._started()
        return stream

    def send(
        self,
        peer_uuid: Union[uuid.UUID, str],
        description_type: Union[DescriptionType, str],
        description: str,
        *,
        worker: Optional[str] = None,
        timeout: Optional[float] = None,
        conversation: bool = False,
        wait_for_conversation: bool = False,
    ) -> None:
        """Sends one message to a peer as this host's identity.

        Returns once the relay has handled the message (the daemon confirms
        it); a message the relay cannot forward comes back on ``subscribe()``
        with ``bounced`` set.

        Args:
            peer_uuid: The receiving peer.
            description_type: ``"offer"`` or ``"answer"``.
            description: The payload.
            worker: The worker label for this send, instead of the client's.
            timeout: How long the daemon may wait for its relay connection to
                be registered (default: the daemon's send timeout).
            conversation: Take part in the conversation with the peer: claim
                it for this worker, or renew it (see ``subscribe``'s
                ``conversations``; the worker needs such a subscription).
            wait_for_conversation: While another worker holds the peer's
                conversation, wait for it to end (up to ``timeout``, else the
                daemon's send timeout) instead of raising ``AbortedError``.

        Raises:
            InvalidArgumentError: A field is malformed or too large (the
                message names it); nothing was sent.
            UnavailableError: Not registered in time; nothing was sent, safe
                to retry.
            UnconfirmedError: Written, but the relay connection was lost before
                the relay confirmed it; retrying may deliver it twice.
            FailedPreconditionError: The relay connection is FAILED.
            AbortedError: Another local worker holds the conversation with the
                peer (any send to it is refused, claiming or not); nothing was
                sent.
            ResourceExhaustedError: ``conversation`` and the host holds as
                many conversations as it keeps; nothing was sent.
        """
        request = _convert.send_request(
            peer_uuid,
            description_type,
            description,
            worker or self.worker or "",
            conversation,
            wait_for_conversation,
        )
        try:
            self._stub.Send(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def subscribe(
        self,
        group: Optional[str] = None,
        *,
        exclusive: bool = False,
        conversations: bool = False,
        timeout: Optional[float] = None,
        resume: float = RESUME_WITHIN,
    ) -> Subscription:
        """Opens a stream of inbound messages and bounces.

        Returns once the daemon has registered the subscription. Every
        ``group`` receives each message once, shared among the subscriptions
        in it; ``None`` is a group of its own that receives every message. The
        stream outlives relay reconnects and restarts of the daemon (within
        ``resume`` seconds), and ends only when it is cancelled or
        ``timeout`` seconds (a deadline for the whole stream) pass.

        With ``exclusive``, the subscription holds ``group`` alone while it is
        open (for a service that must run once per host): it is refused with
        ``AlreadyExistsError`` while the group has another subscription, and
        so is every other subscription to the group until this one ends. A
        resumed subscription holds it again.

        With ``conversations``, a conversation subscription: it receives the
        messages of the conversations this client's worker holds with remote
        peers (claimed by its sends with ``conversation=True``, or started by
        a peer's offer handed to it: each such offer goes to exactly one
        conversation subscription on the host), and nothing else. Its
        ``group`` then only matters for ``exclusive``. When the worker's last
        conversation subscription ends, its conversations end with it.

        Raises:
            AlreadyExistsError: ``exclusive`` and the group is in use, or the
                group is held exclusively by another subscription.
            InvalidArgumentError: ``exclusive`` without a group.
            SubscriptionLostError: While iterating, when the daemon stopped
                and no daemon with the same identity answered within
                ``resume`` seconds (0: at once).
        """
        identity = self.status(timeout=timeout).uuid
        deadline = None if timeout is None else time.monotonic() + timeout
        request = pb.SubscribeRequest(
            group=group or "",
            worker=self.worker or "",
            exclusive=exclusive,
            conversations=conversations,
        )
        resumer = _Resumer(self, request, identity, resume, deadline)
        call = self._stub.Subscribe(request, timeout=timeout)
        subscription = Subscription(call, resumer)
        subscription._started()
        return subscription

    def hold_conversation(
        self,
        peer_uuid: Union[uuid.UUID, str],
        *,
        wait: bool = False,
        timeout: Optional[float] = None,
    ) -> float:
        """Claims the conversation with a peer for this client's worker
        without sending, or renews it if the worker holds it: what keeps a
        conversation whose WebRTC connection is up (and so quiet on the
        relay). Returns the seconds it lasts without another sign of life;
        renew well within them.

        Raises:
            AbortedError: Another worker holds it (with ``wait``: still, once
                ``timeout`` or the daemon's send timeout has passed).
            InvalidArgumentError: A malformed uuid, or the worker has no
                conversation subscription.
            ResourceExhaustedError: The host holds as many conversations as
                it keeps.
        """
        request = pb.HoldConversationRequest(
            peer_uuid=str(peer_uuid), worker=self.worker or "", wait=wait
        )
        try:
            response = self._stub.HoldConversation(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return response.expires_in.ToTimedelta().total_seconds()

    def release_conversation(
        self, peer_uuid: Union[uuid.UUID, str], *, timeout: Optional[float] = None
    ) -> bool:
        """Ends this client's worker's conversation with a peer. Returns
        whether it held it (another worker's is left alone)."""
        request = pb.ReleaseConversationRequest(peer_uuid=str(peer_uuid), worker=self.worker or "")
        try:
            response = self._stub.ReleaseConversation(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return response.released

    def reconnect(self, *, timeout: Optional[float] = None) -> None:
        """Drops the relay connection and registers again at once: the way out
        of ``ConnectionState.FAILED``. Returns when the new attempt has
        started; watch the status for its outcome."""
        try:
            self._stub.Reconnect(pb.ReconnectRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
