"""The asyncio ``Client`` and the streams it opens.

The same calls as ``relay_sidecar.Client``, as coroutines::

    async with relay_sidecar.aio.Client() as client:
        status = await client.status()
        async with await client.subscribe() as messages:
            await client.send(peer, "offer", "v=0 ...")
            async for message in messages:
                ...

and a session, a subscription and a SendStream on one connection::

    async with await client.session() as session:
        await session.send(peer, "offer", "v=0 ...")  # returns once settled
        pending = [await session.queue(peer, "offer", d) for d in many]
        await asyncio.gather(*pending)  # many in flight
        async for message in session:
            ...
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Generic,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import grpc
import grpc.aio

from . import _convert
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2_grpc as pb_grpc
from ._socket import CHANNEL_OPTIONS, PathLike, find, target
from ._types import DescriptionType, PeerMessage, Status
from .client import (
    _DAEMON_GONE,
    CLOSE_WITHIN,
    RESUME_WITHIN,
    SESSION_IN_FLIGHT,
    _Ended,
    _failure,
    _Loss,
    _Outbound,
    _Outcomes,
    _Refused,
    _Resumer,
    _Resuming,
    _Sending,
)
from .errors import from_rpc_error, from_status

__all__ = ["Client", "Session", "StatusStream", "Subscription"]

T = TypeVar("T")


class _Stream(Generic[T]):
    """A server stream from the daemon as an async iterator of SDK values.

    Iteration ends when the daemon ends the stream (it is stopping) or after
    ``cancel()``; a failed stream raises the SDK's error.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert
        self._cancelled = False

    async def _started(self) -> None:
        """Waits until the daemon has accepted the call, so that nothing the
        daemon sends after this returns is missed; raises its refusal."""
        try:
            await self._call.initial_metadata()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if self._call.done():
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                raise from_status(code, await self._call.details())

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._cancelled:
                raise StopAsyncIteration
            try:
                item = await self._call.read()
            except asyncio.CancelledError:
                # grpc.aio reports its own cancel() as CancelledError; a cancel of
                # the awaiting task must still propagate.
                if self._cancelled and self._call.cancelled():
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as e:
                if e.code() in _DAEMON_GONE and not self._cancelled:
                    await self._gone(f"stopped ({e.details()})", e)
                    continue
                raise from_rpc_error(e) from None
            if item is grpc.aio.EOF:
                await self._gone("ended the stream", None)
                continue
            return self._convert(item)

    async def _gone(self, why: str, error: Optional[grpc.RpcError]) -> None:
        """The daemon ended the stream or went away: here the stream ends."""
        if error is None:
            raise StopAsyncIteration
        raise from_rpc_error(error) from None

    def cancel(self) -> None:
        """Ends the stream; a pending or later ``__anext__`` stops iteration."""
        self._cancelled = True
        self._call.cancel()

    async def aclose(self) -> None:
        """``cancel()``, as a coroutine for ``contextlib.aclosing`` and friends."""
        self.cancel()

    async def __aenter__(self) -> _Stream[T]:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.cancel()


class Subscription(_Resuming, _Stream[PeerMessage]):
    """Inbound messages and bounces from ``Client.subscribe()``: an async
    iterator of ``PeerMessage`` and an async context manager that cancels it.

    Like ``relay_sidecar.Subscription``, it outlives a restart of the daemon
    (within ``resume`` seconds) and raises ``SubscriptionLostError`` when no
    daemon with the same identity comes back in time.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall, resumer: _Resumer) -> None:
        super().__init__(call, _convert.peer_message)
        self._resumer = resumer

    async def _gone(self, why: str, error: Optional[grpc.RpcError]) -> None:
        resumer = self._resumer
        if resumer.past_deadline():
            await super()._gone(why, error)
        try:
            resumer.begin(why)
            while True:
                left = resumer.left()
                try:
                    self._call = await self._reopen(left)
                except grpc.RpcError as e:
                    await asyncio.sleep(resumer.failed(e))
                    continue
                resumer.done()
                return
        except BaseException:
            self._cancelled = True
            raise

    async def _reopen(self, within: float) -> grpc.aio.UnaryStreamCall:
        stub = self._resumer.client._stub
        status = await stub.GetStatus(pb.GetStatusRequest(), timeout=within, wait_for_ready=True)
        self._resumer.same_peer(status)
        timeout = self._resumer.call_timeout()
        # Fail-fast: only the bounded GetStatus above waits for a daemon. A
        # daemon that answered it and stopped at once fails this (to try
        # again), where a waiting call without a deadline would hang.
        call = stub.Subscribe(self._resumer.request, timeout=timeout)
        await call.initial_metadata()
        if call.done() and await call.code() != grpc.StatusCode.OK:
            raise _Refused(await call.code(), await call.details())
        return call


class Session(_Sending):
    """A worker's two streams on one connection, from ``Client.session()``:
    sends on one ``SendStream`` call held open, and inbound messages on a
    ``Subscription``; an async iterator of ``PeerMessage`` and an async context
    manager that closes it.

    ``await session.send(...)`` returns once the message is settled;
    ``await session.queue(...)`` returns once it is queued, with an
    ``asyncio.Future`` of its outcome, so that many can be in flight. Messages
    go out in the order they were accepted. As ``relay_sidecar.Session``: at
    most ``SESSION_IN_FLIGHT`` are unsettled (``queue`` waits for room), and
    when the daemon stops, what its stream had written and not settled fails
    with ``UnconfirmedError`` while the rest goes, in order, on a new stream
    once a daemon with the same identity answers (within ``resume``).
    """

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription
        self._resumer = subscription._resumer
        self._bound = SESSION_IN_FLIGHT
        self._room = asyncio.Event()
        self._room.set()
        self._unsettled = 0
        self._closed = False
        self._stream = self._open([])

    @property
    def resumed(self) -> int:
        """How many times the subscription was opened again."""
        return self._subscription.resumed

    async def send(
        self,
        peer_uuid: Union[uuid.UUID, str],
        description_type: Union[DescriptionType, str],
        description: str,
        *,
        conversation: bool = False,
    ) -> None:
        """Sends one message to a peer, after the ones sent before it, and
        returns once the daemon has settled it OK; raises what
        ``Client.send`` raises for it (``InvalidArgumentError``,
        ``UnconfirmedError``, ``AbortedError``, ...; a session never waits for
        a conversation another worker holds).

        Raises:
            RuntimeError: The session is closed.
        """
        future = await self.queue(
            peer_uuid, description_type, description, conversation=conversation
        )
        await future

    async def queue(
        self,
        peer_uuid: Union[uuid.UUID, str],
        description_type: Union[DescriptionType, str],
        description: str,
        *,
        conversation: bool = False,
    ) -> asyncio.Future[None]:
        """Queues one message, after the ones queued before it, once fewer
        than ``SESSION_IN_FLIGHT`` are unsettled; returns a future that resolves
        as ``send`` returns or raises.

        Raises:
            RuntimeError: The session is closed.
        """
        request = self._request(peer_uuid, description_type, description, conversation)
        while self._unsettled >= self._bound and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            raise RuntimeError("send on a closed session")
        if self._stream.ended:
            self._stream = self._open([])
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stream.add(future, request)
        self._unsettled += 1
        return future

    def _open(self, carried: List[Tuple[Any, Any]]) -> _Outbound:
        ready = asyncio.Event()
        stream = _Outbound(ready, ready.set, carried)
        stream.runner = asyncio.ensure_future(self._run(stream))
        return stream

    async def _run(self, stream: _Outbound) -> None:
        """Runs one SendStream: checks the daemon, opens the call, settles its
        messages as the daemon reports them, and ends them at its end."""
        stub = self._resumer.client._stub
        writer: Optional[asyncio.Future] = None
        loss: Optional[_Loss] = None
        again = False
        try:
            stream.call = stub.GetStatus(pb.GetStatusRequest(), **self._check_args())
            try:
                self._checked(await stream.call)
            except grpc.RpcError as e:
                raise self._not_back(e) from None
            stream.call = stub.SendStream(timeout=self._resumer.call_timeout())
            writer = asyncio.ensure_future(self._write(stream))
            async for response in stream.call:
                self._resolve(stream.settle(response))
            loss, again = self._loss(stream, grpc.StatusCode.OK, ""), True
        except grpc.RpcError as e:
            loss, again = self._loss(stream, e.code(), e.details()), e.code() in _DAEMON_GONE
        except asyncio.CancelledError:
            # close() gave up on the stream (or the loop is ending): the
            # messages' outcomes are what matters, so the task ends quietly.
            pass
        except _Ended as e:
            loss = e.loss
        except Exception as e:  # noqa: BLE001 - the futures carry it to the caller
            loss = _failure(e)
        finally:
            if writer is not None:
                writer.cancel()
            if stream.call is not None:
                stream.call.cancel()  # a no-op on a call that has ended
            loss = loss or self._loss(stream, grpc.StatusCode.CANCELLED, "")
            self._resolve(stream.end(loss, self._keeps(stream, again)))
            if stream.kept:
                self._stream = self._open(stream.kept)

    async def _write(self, stream: _Outbound) -> None:
        """Writes the messages as ``queue`` queued them; ``None`` half-closes."""
        call = stream.call
        try:
            while True:
                while not stream.queued:
                    stream.ready.clear()
                    await stream.ready.wait()
                request = stream.take()
                if request is None:
                    await call.done_writing()
                    return
                await call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call ended: _run ends what is left

    def _resolve(self, done: _Outcomes) -> None:
        """Gives the settled futures their outcomes and makes room."""
        if not done:
            return
        self._unsettled -= len(done)
        self._room.set()
        for future, error in done:
            if future.done():  # its awaiting task was cancelled
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    async def close(self, timeout: Optional[float] = CLOSE_WITHIN) -> None:
        """Half-closes the SendStream, waits up to ``timeout`` seconds for the
        daemon to settle what is outstanding (the rest fails with
        ``UnconfirmedError``, or ``UnavailableError`` if not yet written), and
        cancels the subscription. Every future of the session is resolved
        when it returns. Idempotent."""
        stream = None if self._closed else self._stream
        self._closed = True
        self._room.set()
        if stream is not None:
            stream.half_close()
            await asyncio.wait({stream.runner}, timeout=timeout)
            if not stream.ended:
                stream.abandoned = True
                stream.runner.cancel()
                await asyncio.wait({stream.runner})
        self._subscription.cancel()

    aclose = close

    def __aiter__(self) -> AsyncIterator[PeerMessage]:
        return self

    async def __anext__(self) -> PeerMessage:
        return await self._subscription.__anext__()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class StatusStream(_Stream[Status]):
    """Status updates from ``Client.watch_status()``: an async iterator of
    ``Status`` and an async context manager that cancels it."""


class Client:
    """An asyncio connection to the relay-sidecar daemon.

    Every process that uses it sends and receives as the host's one peer
    identity. Calls may run concurrently. The gRPC channel is opened on the
    first call, in the event loop that makes it; use a client from that loop
    only. If the daemon restarts, later calls reach the new one on the same
    socket path.

    Args:
        socket_path: The daemon's Unix socket; ``None``: by the shared rule,
            ``$RELAY_SIDECAR_SOCKET`` when set, else the first that answers
            of the user's own daemon's and the system service's (see
            ``relay_sidecar.default_socket_path()``).
        worker: A label sent with every send and subscribe made through this
            client. Replies from a peer go preferably to the subscription of
            the worker that last sent to it; without a label the calling
            process is the worker, so set one when several tasks each send
            and subscribe.

    Raises:
        ConnectError: The socket is missing or no daemon listens on it (checked
            at once, without a running event loop).
    """

    def __init__(
        self, socket_path: Optional[PathLike] = None, *, worker: Optional[str] = None
    ) -> None:
        self.socket_path = find(socket_path)
        self.worker = worker
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub_: Optional[pb_grpc.RelaySidecarStub] = None

    def __repr__(self) -> str:
        return f"aio.Client({self.socket_path!r}, worker={self.worker!r})"

    @property
    def _stub(self) -> pb_grpc.RelaySidecarStub:
        if self._stub_ is None:
            self._channel = grpc.aio.insecure_channel(
                target(self.socket_path), options=CHANNEL_OPTIONS
            )
            self._stub_ = pb_grpc.RelaySidecarStub(self._channel)
        return self._stub_

    async def close(self) -> None:
        """Closes the connection; open streams end. A later call opens a new one."""
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def status(self, *, timeout: Optional[float] = None) -> Status:
        """The daemon's identity, connection state and counters."""
        try:
            response = await self._stub.GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.status(response)

    async def watch_status(self, *, timeout: Optional[float] = None) -> StatusStream:
        """A stream of statuses: the current one at once, then one at every
        change of the connection state, until it is cancelled, the daemon
        stops, or ``timeout`` seconds (a deadline for the whole stream) pass.
        """
        call = self._stub.WatchStatus(pb.WatchStatusRequest(), timeout=timeout)
        stream = StatusStream(call, _convert.status_update)
        await stream._started()
        return stream

    async def send(
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
            await self._stub.Send(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def subscribe(
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
        identity = (await self.status(timeout=timeout)).uuid
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
        await subscription._started()
        return subscription

    async def session(
        self,
        group: Optional[str] = None,
        *,
        exclusive: bool = False,
        conversations: bool = False,
        timeout: Optional[float] = None,
        resume: float = RESUME_WITHIN,
    ) -> Session:
        """Opens a session: a ``subscribe()`` with these arguments and one
        ``SendStream`` call held open beside it, both on this client's
        connection, for a worker that sends and receives a lot (see
        ``relay_sidecar.Client.session``).

        Raises:
            The errors of ``subscribe()``.
        """
        subscription = await self.subscribe(
            group,
            exclusive=exclusive,
            conversations=conversations,
            timeout=timeout,
            resume=resume,
        )
        return Session(subscription)

    async def hold_conversation(
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
            response = await self._stub.HoldConversation(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return response.expires_in.ToTimedelta().total_seconds()

    async def release_conversation(
        self, peer_uuid: Union[uuid.UUID, str], *, timeout: Optional[float] = None
    ) -> bool:
        """Ends this client's worker's conversation with a peer. Returns
        whether it held it (another worker's is left alone)."""
        request = pb.ReleaseConversationRequest(peer_uuid=str(peer_uuid), worker=self.worker or "")
        try:
            response = await self._stub.ReleaseConversation(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return response.released

    async def reconnect(self, *, timeout: Optional[float] = None) -> None:
        """Drops the relay connection and registers again at once: the way out
        of ``ConnectionState.FAILED``. Returns when the new attempt has
        started; watch the status for its outcome."""
        try:
            await self._stub.Reconnect(pb.ReconnectRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
