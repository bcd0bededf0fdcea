"""The blocking ``Client`` and the streams it opens."""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from types import TracebackType
from typing import (
    Any,
    Callable,
    Deque,
    Generic,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import grpc

from . import _convert
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2 as pb
from ._proto.relay_sidecar.v1 import relay_sidecar_pb2_grpc as pb_grpc
from ._socket import CHANNEL_OPTIONS, PathLike, find, target
from ._types import DescriptionType, PeerMessage, Status
from .errors import (
    ProtocolError,
    RelaySidecarError,
    SubscriptionLostError,
    UnavailableError,
    UnconfirmedError,
    from_code_number,
    from_rpc_error,
    from_status,
)

__all__ = [
    "CLOSE_WITHIN",
    "Client",
    "RESUME_WITHIN",
    "SESSION_IN_FLIGHT",
    "Session",
    "StatusStream",
    "Subscription",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: How long a subscription waits, by default, for its daemon to come back
#: after it stopped: a restart (by systemd, which waits 2 s, or by a job
#: script) takes a few seconds, and a worker whose daemon is gone for good
#: learns it within half a minute.
RESUME_WITHIN = 30.0
#: The most sends one session may have unsettled (accepted by ``send``, no
#: outcome yet); past it ``send`` waits for room. The daemon works on at most
#: 1,024 messages of one SendStream at a time (chunks of 64, 16 in flight), so
#: more would only wait in buffers; and a worker that outruns its relay is
#: slowed here instead of piling up messages without bound.
SESSION_IN_FLIGHT = 1024
#: How long ``Session.close()`` waits, by default, for the daemon to settle the
#: sends still outstanding: a message may wait for the relay connection up to
#: the daemon's send timeout (30 s by default).
CLOSE_WITHIN = 30.0
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
        # Fail-fast: only the bounded GetStatus above waits for a daemon. A
        # daemon that answered it and stopped at once fails this (to try
        # again), where a waiting call without a deadline would hang.
        call = stub.Subscribe(self._resumer.request, timeout=timeout)
        call.initial_metadata()
        if call.done() and call.code() != grpc.StatusCode.OK:
            raise _Refused(call.code(), call.details())
        return call


#: What a SendStream failure makes of one of its unsettled messages: the
#: function of whether gRPC had taken the message to write.
_Loss = Callable[[bool], Exception]
#: Futures with their outcome: ``None`` for OK, else the error.
_Outcomes = List[Tuple[Any, Optional[Exception]]]


def _lost(why: str, written: bool) -> RelaySidecarError:
    """The error of a message whose stream ended before it was settled: it may
    have gone out if it was written, and certainly did not if it was not."""
    if written:
        return UnconfirmedError(
            f"{why}; it was written, not settled: it may or may not have been sent"
        )
    return UnavailableError(f"{why}; it was not sent")


class _Ended(Exception):
    """A session's SendStream cannot go on; ``loss`` says how its unsettled
    messages fail."""

    def __init__(self, loss: _Loss) -> None:
        super().__init__()
        self.loss = loss


class _Outbound:
    """One SendStream call of a session, for the blocking and the asyncio
    ``Session`` alike: its messages without an outcome, in the stream's
    order, and what they become when the daemon settles them or the call
    ends first.

    ``ready`` is what the writer waits on for ``queued``; ``wake`` wakes it.
    Both sessions touch the stream under their one lock (or in their loop).
    """

    def __init__(self, ready: Any, wake: Callable[[], Any], carried: List[Tuple[Any, Any]]) -> None:
        self.ready, self._wake = ready, wake
        #: The requests gRPC has not taken to write; ``None`` half-closes.
        self.queued: Deque[Any] = collections.deque()
        #: The futures of the messages without an outcome, in order.
        self.unsettled: Deque[Any] = collections.deque()
        #: How many of the stream's messages have an outcome.
        self.settled = 0
        #: How many gRPC has taken to write: none after them reached the daemon.
        self.written = 0
        self.ended = False
        #: Given up by ``close()``, not ended by the daemon.
        self.abandoned = False
        #: The call under way (the daemon check, then the SendStream), to cancel.
        self.call: Any = None
        #: The thread or task that runs the call.
        self.runner: Any = None
        #: After ``end(keep=True)``: the messages never written, for the next stream.
        self.kept: List[Tuple[Any, Any]] = []
        for future, request in carried:
            self.add(future, request)

    def add(self, future: Any, request: Any) -> None:
        self.unsettled.append(future)
        self.queued.append(request)
        self._wake()

    def half_close(self) -> None:
        self.queued.append(None)
        self._wake()

    def take(self) -> Any:
        """The next request for gRPC to write (``queued`` is not empty);
        ``None``: half-close."""
        request = self.queued.popleft()
        if request is not None:
            self.written += 1
        return request

    def settle(self, response: Any) -> _Outcomes:
        """The futures ``response`` settles, in order; a count the stream does
        not allow is a ``ProtocolError``."""
        if self.ended:
            return []
        if not self.settled <= response.settled <= self.written:
            raise ProtocolError(
                f"SendStream settled {response.settled} messages, with {self.settled} "
                f"settled and {self.written} written before"
            )
        failures = {failure.index: failure for failure in response.failures}
        done: _Outcomes = []
        while self.settled < response.settled:
            failure = failures.get(self.settled)
            error = None if failure is None else from_code_number(failure.code, failure.message)
            done.append((self.unsettled.popleft(), error))
            self.settled += 1
        return done

    def end(self, loss: _Loss, keep: bool = False) -> _Outcomes:
        """Ends the stream (once): its unsettled messages fail by ``loss``;
        with ``keep``, those gRPC never took to write (so never sent) go to
        ``kept`` instead, for the next stream to send."""
        if self.ended:
            return []
        self.ended = True
        futures, written = list(self.unsettled), self.written - self.settled
        if keep:
            requests = [request for request in self.queued if request is not None]
            self.kept = list(zip(futures[written:], requests))
            futures = futures[:written]
        self.unsettled.clear()
        self.queued.clear()
        self.half_close()  # ends a writer still waiting
        return [(future, loss(offset < written)) for offset, future in enumerate(futures)]


class _Sending:
    """What the blocking and the asyncio ``Session`` share: the requests, the
    check of the daemon before each SendStream, and how a stream's end fails
    its unsettled messages."""

    _resumer: _Resumer
    _unsettled: int
    _closed: bool

    @property
    def unsettled(self) -> int:
        """How many sends have no outcome yet (at most ``SESSION_IN_FLIGHT``)."""
        return self._unsettled

    def _request(
        self,
        peer_uuid: Union[uuid.UUID, str],
        description_type: Union[DescriptionType, str],
        description: str,
        conversation: bool,
    ) -> Any:
        worker = self._resumer.client.worker or ""
        return _convert.send_request(peer_uuid, description_type, description, worker, conversation)

    def _check_args(self) -> dict:
        """GetStatus's arguments for the check before a SendStream opens: it
        waits up to ``resume`` seconds for a daemon, as the subscription does."""
        resume, left = self._resumer.resume, self._resumer.call_timeout()
        if resume > 0:
            left = resume if left is None else min(resume, left)
        return {"timeout": left, "wait_for_ready": resume > 0}

    def _checked(self, status: Any) -> None:
        """Refuses to send through a daemon that came back as another peer."""
        now, was = uuid.UUID(status.uuid), self._resumer.identity
        if now != was:
            where = self._resumer.socket_path
            why = f"the daemon at {where} came back as another peer ({now}, was {was})"
            raise _Ended(functools.partial(_lost, f"{why}; open a new session to use it"))

    def _not_back(self, error: grpc.RpcError) -> _Ended:
        """The check failed: no daemon answered in time, or it refused."""
        code, details = error.code(), error.details()
        if self._resumer.past_deadline():
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "the session's timeout has passed"
        elif code in _DAEMON_GONE | {grpc.StatusCode.DEADLINE_EXCEEDED}:
            resume = self._resumer.resume
            waited = f"within {resume:g}s" if resume > 0 else "(not waited for)"
            why = f"no daemon answered at {self._resumer.socket_path} {waited}"
            return _Ended(functools.partial(_lost, f"{why} ({code.name}: {details})"))
        return _Ended(lambda written: from_status(code, details))

    def _keeps(self, stream: _Outbound, again: bool) -> bool:
        """Whether the messages a stream never wrote go on a new one: when the
        daemon went away from a stream that worked (one that failed at once
        would fail again), and the session is not closing."""
        return again and stream.written > 0 and not self._closed

    def _loss(self, stream: _Outbound, code: grpc.StatusCode, details: Optional[str]) -> _Loss:
        """How the unsettled messages of a SendStream that ended with ``code``
        fail: lost (``UnconfirmedError`` if written) when the daemon went away
        or the session gave up, else the daemon's status for each."""
        where = self._resumer.socket_path
        if stream.abandoned:
            why = "the session was closed"
        elif code == grpc.StatusCode.OK:
            why = f"the daemon at {where} ended the stream"
        elif code in _DAEMON_GONE:
            why = f"the daemon at {where} stopped ({code.name}: {details})"
        else:
            return lambda written: from_status(code, details)
        return functools.partial(_lost, why)


def _failure(error: Exception) -> _Loss:
    """A stream that failed in the SDK (a protocol error, a closed client):
    each unsettled message fails with that error."""
    if isinstance(error, ProtocolError):
        return lambda written: ProtocolError(error.message)
    return lambda written: error


#: Set on a session's own threads, which run the futures' callbacks.
_runner = threading.local()


class Session(_Sending):
    """A worker's two streams on one connection, from ``Client.session()``:
    sends on one ``SendStream`` call held open, and inbound messages on a
    ``Subscription``. A message costs one frame each way and no call of its
    own; the daemon confirms them in batches.

    ``send`` returns a ``concurrent.futures.Future`` at once; messages go out in
    the order ``send`` accepted them (from any thread). Iterating the session
    iterates its subscription, which outlives daemon restarts as any does.
    As a context manager it closes on exit.

    At most ``SESSION_IN_FLIGHT`` sends are unsettled at a time; ``send``
    waits for room past it (a callback on one of its futures does not wait:
    it runs on the session's thread, which makes the room).

    When the daemon stops, the messages its stream had written and not
    settled fail with ``UnconfirmedError`` (they may have gone out); those not
    yet written go, in order, on a new stream, which waits up to the
    subscription's ``resume`` seconds for a daemon with the same identity (and
    fails them with ``UnavailableError`` if none answers).
    """

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription
        self._resumer = subscription._resumer
        self._bound = SESSION_IN_FLIGHT
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._unsettled = 0
        self._closed = False
        self._stream = self._open([])

    @property
    def resumed(self) -> int:
        """How many times the subscription was opened again."""
        return self._subscription.resumed

    def send(
        self,
        peer_uuid: Union[uuid.UUID, str],
        description_type: Union[DescriptionType, str],
        description: str,
        *,
        conversation: bool = False,
    ) -> Future:
        """Sends one message to a peer, after the ones sent before it.

        Returns a ``Future`` that resolves to ``None`` when the daemon has
        settled the message OK (as ``Client.send`` returns), or raises what
        ``Client.send`` raises for it (``InvalidArgumentError``,
        ``UnconfirmedError``, ``AbortedError``, ...; a conversation held by
        another worker is ``AbortedError`` at once: a session never waits for
        one). Waits while ``SESSION_IN_FLIGHT`` sends are unsettled.

        Raises:
            RuntimeError: The session is closed.
        """
        request = self._request(peer_uuid, description_type, description, conversation)
        future: Future = Future()
        # A message cannot be called back: the future is never cancelled.
        future.set_running_or_notify_cancel()
        with self._lock:
            while (
                self._unsettled >= self._bound
                and not self._closed
                and getattr(_runner, "session", None) is not self
            ):
                self._room.wait()
            if self._closed:
                raise RuntimeError("send on a closed session")
            if self._stream.ended:
                self._stream = self._open([])
            self._stream.add(future, request)
            self._unsettled += 1
        return future

    def _open(self, carried: List[Tuple[Any, Any]]) -> _Outbound:
        ready = threading.Condition(self._lock)
        stream = _Outbound(ready, ready.notify, carried)
        stream.runner = threading.Thread(
            target=self._run, args=(stream,), name="relay-sidecar-session", daemon=True
        )
        stream.runner.start()
        return stream

    def _run(self, stream: _Outbound) -> None:
        """Runs one SendStream: checks the daemon, opens the call, settles its
        messages as the daemon reports them, and ends them at its end."""
        _runner.session = self
        stub = self._resumer.client._stub
        loss: Optional[_Loss] = None
        again = False
        try:
            check = stub.GetStatus.future(pb.GetStatusRequest(), **self._check_args())
            if self._started(stream, check):
                try:
                    self._checked(check.result())
                except grpc.RpcError as e:
                    raise self._not_back(e) from None
                timeout = self._resumer.call_timeout()
                call = stub.SendStream(self._requests(stream), timeout=timeout)
                if self._started(stream, call):
                    for response in call:
                        with self._lock:
                            done = stream.settle(response)
                        self._resolve(done)
                    loss, again = self._loss(stream, grpc.StatusCode.OK, ""), True
        except grpc.RpcError as e:
            loss, again = self._loss(stream, e.code(), e.details()), e.code() in _DAEMON_GONE
        except grpc.FutureCancelledError:
            pass  # close() gave up on the check
        except _Ended as e:
            loss = e.loss
        except Exception as e:  # noqa: BLE001 - the futures carry it to the caller
            if stream.call is not None:
                stream.call.cancel()
            loss = _failure(e)
        finally:
            with self._lock:
                loss = loss or self._loss(stream, grpc.StatusCode.CANCELLED, "")
                done = stream.end(loss, self._keeps(stream, again))
                if stream.kept:
                    self._stream = self._open(stream.kept)
            self._resolve(done)

    def _started(self, stream: _Outbound, call: Any) -> bool:
        """Makes ``call`` the stream's, unless ``close()`` gave up on it."""
        with self._lock:
            stream.call = call
            if stream.abandoned:
                call.cancel()
            return not stream.abandoned

    def _requests(self, stream: _Outbound) -> Iterator[Any]:
        """The messages for gRPC to write, as ``send`` queued them."""
        while True:
            with self._lock:
                while not stream.queued:
                    stream.ready.wait()
                request = stream.take()
            if request is None:
                return
            yield request

    def _resolve(self, done: _Outcomes) -> None:
        """Gives the settled futures their outcomes (callbacks run here)."""
        if not done:
            return
        with self._lock:
            self._unsettled -= len(done)
            self._room.notify_all()
        for future, error in done:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def close(self, timeout: Optional[float] = CLOSE_WITHIN) -> None:
        """Half-closes the SendStream, waits up to ``timeout`` seconds for the
        daemon to settle what is outstanding (the rest fails with
        ``UnconfirmedError``, or ``UnavailableError`` if not yet written), and
        cancels the subscription. Every future of the session is resolved
        when it returns. Idempotent."""
        with self._lock:
            stream = None if self._closed else self._stream
            self._closed = True
            self._room.notify_all()
            if stream is not None:
                stream.half_close()
        if stream is not None:
            if stream.runner is not threading.current_thread():  # not from a callback
                stream.runner.join(timeout)
            with self._lock:
                stream.abandoned = not stream.ended
                done = stream.end(self._loss(stream, grpc.StatusCode.CANCELLED, ""))
                call = stream.call
            self._resolve(done)
            if stream.abandoned and call is not None:
                call.cancel()
        self._subscription.cancel()

    def __iter__(self) -> Iterator[PeerMessage]:
        return self

    def __next__(self) -> PeerMessage:
        return next(self._subscription)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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

    def session(
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
        connection, for a worker that sends and receives a lot. Each message
        then costs one HTTP/2 frame each way, with no call of its own.

        ``session.send(...)`` returns a ``Future`` of the message's outcome;
        ``for message in session`` iterates the subscription. ``timeout`` is a
        deadline for the whole session; ``resume`` bounds how long the
        subscription, and a new stream after the daemon stopped, wait for it
        to come back.

        Raises:
            The errors of ``subscribe()``.
        """
        subscription = self.subscribe(
            group,
            exclusive=exclusive,
            conversations=conversations,
            timeout=timeout,
            resume=resume,
        )
        return Session(subscription)

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
