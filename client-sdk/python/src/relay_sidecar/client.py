"""The blocking ``Client`` and the streams it opens."""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Any, Callable, Generic, Iterator, Optional, Type, TypeVar, Union

import grpc

from . import _convert
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2_grpc as pb_grpc
from ._socket import CHANNEL_OPTIONS, PathLike, probe, resolve, target
from ._types import DescriptionType, PeerMessage, Status
from .errors import from_rpc_error

__all__ = ["Client", "StatusStream", "Subscription"]

T = TypeVar("T")


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
        try:
            item = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(e) from None
        return self._convert(item)

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


class Subscription(_Stream[PeerMessage]):
    """Inbound messages and bounces from ``Client.subscribe()``: an iterator
    of ``PeerMessage`` and a context manager that cancels it."""


class StatusStream(_Stream[Status]):
    """Status updates from ``Client.watch_status()``: an iterator of
    ``Status`` and a context manager that cancels it."""


class Client:
    """A blocking connection to the relay-sidecar daemon.

    Every process that uses it sends and receives as the host's one peer
    identity. Safe to share between threads. If the daemon restarts, later
    calls reach the new one on the same socket path.

    Args:
        socket_path: The daemon's Unix socket; ``None`` for
            ``default_socket_path()`` (``$RELAY_SIDECAR_SOCKET``, then the
            daemon's default).
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
        self.socket_path = resolve(socket_path)
        self.worker = worker
        probe(self.socket_path)
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

        Raises:
            InvalidArgumentError: A field is malformed or too large (the
                message names it); nothing was sent.
            UnavailableError: Not registered in time; nothing was sent, safe
                to retry.
            UnconfirmedError: Written, but the relay connection was lost before
                the relay confirmed it; retrying may deliver it twice.
            FailedPreconditionError: The relay connection is FAILED.
        """
        request = _convert.send_request(
            peer_uuid, description_type, description, worker or self.worker or ""
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
        timeout: Optional[float] = None,
    ) -> Subscription:
        """Opens a stream of inbound messages and bounces.

        Returns once the daemon has registered the subscription. Every
        ``group`` receives each message once, shared among the subscriptions
        in it; ``None`` is a group of its own that receives every message. The
        stream outlives relay reconnects and ends only when it is cancelled,
        the daemon stops, or ``timeout`` seconds (a deadline for the whole
        stream) pass.

        With ``exclusive``, the subscription holds ``group`` alone while it is
        open (for a service that must run once per host): it is refused with
        ``AlreadyExistsError`` while the group has another subscription, and
        so is every other subscription to the group until this one ends.

        Raises:
            AlreadyExistsError: ``exclusive`` and the group is in use, or the
                group is held exclusively by another subscription.
            InvalidArgumentError: ``exclusive`` without a group.
        """
        request = pb.SubscribeRequest(
            group=group or "", worker=self.worker or "", exclusive=exclusive
        )
        call = self._stub.Subscribe(request, timeout=timeout)
        subscription = Subscription(call, _convert.peer_message)
        subscription._started()
        return subscription

    def reconnect(self, *, timeout: Optional[float] = None) -> None:
        """Drops the relay connection and registers again at once: the way out
        of ``ConnectionState.FAILED``. Returns when the new attempt has
        started; watch the status for its outcome."""
        try:
            self._stub.Reconnect(pb.ReconnectRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
