"""Sessions (``Client.session()``: one SendStream and one Subscribe on one
connection) against the real daemon on the real ProxyStore relay, the daemon
sending to itself so that every message it sends comes back to the same
session."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
from typing import Iterable, List

import pytest

import relay_sidecar
import relay_sidecar.client
from support import Daemon, Relay

#: More than any test here has in flight, so that a subscriber that reads
#: after sending loses nothing to the daemon's per-subscriber bound.
ROOMY = {"subscriber_queue": "8192", "backlog": "8192"}
#: The most a test waits for one outcome or message: a generous failure
#: guard, not a measure.
WITHIN = 30.0
#: The daemon's limit on one relay frame (its default ``max_message_bytes``).
MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture
def roomy(relay: Relay):
    daemon = Daemon(relay.url, settings=ROOMY)
    yield daemon
    daemon.close()


def outcomes(futures: Iterable[concurrent.futures.Future]) -> List[object]:
    """Each future's outcome: ``None`` for OK, else its exception."""
    return [f.exception(WITHIN) for f in futures]


def descriptions(messages, count: int, prefix: str = "") -> List[str]:
    """The descriptions of the next ``count`` messages that start with
    ``prefix`` (others are skipped)."""
    seen = []
    for message in messages:
        if message.description.startswith(prefix):
            seen.append(message.description)
            if len(seen) == count:
                break
    return seen


def test_two_thousand_sends_arrive_in_order_each_settled_ok(roomy: Daemon) -> None:
    count = 2000
    with relay_sidecar.Client(roomy.socket) as client:
        with client.session(timeout=120) as session:
            futures = [session.send(roomy.uuid, "offer", str(i)) for i in range(count)]
            assert all(isinstance(f, concurrent.futures.Future) for f in futures)
            assert outcomes(futures) == [None] * count
            assert descriptions(session, count) == [str(i) for i in range(count)]
        counters = client.status().counters
    assert counters.sent >= count
    assert counters.dropped == 0


def test_a_refused_message_fails_only_its_own_future(roomy: Daemon) -> None:
    with relay_sidecar.Client(roomy.socket) as client:
        with client.session(timeout=60) as session:
            futures = [
                session.send(roomy.uuid, "offer", "first"),
                session.send(roomy.uuid, "greeting", "bad type"),
                session.send(roomy.uuid, "answer", "second"),
                session.send(roomy.uuid, "offer", "x" * (MAX_MESSAGE_BYTES + 1)),
                session.send("not-a-uuid", "offer", "bad peer"),
                session.send(roomy.uuid, relay_sidecar.DescriptionType.OFFER, "third"),
            ]
            first, bad_type, second, too_big, bad_peer, third = outcomes(futures)
            assert (first, second, third) == (None, None, None)
            # The same classes, codes and messages as Client.send raises.
            assert isinstance(bad_type, relay_sidecar.InvalidArgumentError), bad_type
            assert "description_type" in bad_type.message
            assert isinstance(too_big, relay_sidecar.InvalidArgumentError), too_big
            assert "description" in too_big.message
            assert isinstance(bad_peer, relay_sidecar.InvalidArgumentError), bad_peer
            assert "not-a-uuid" in bad_peer.message
            with pytest.raises(relay_sidecar.InvalidArgumentError) as unary:
                client.send(roomy.uuid, "greeting", "bad type")
            assert (bad_type.code, str(bad_type)) == (unary.value.code, str(unary.value))
            # Only the good ones went out, in order.
            assert descriptions(session, 3) == ["first", "second", "third"]


def test_sends_from_four_threads_all_settle_each_thread_in_order(roomy: Daemon) -> None:
    threads, each = 4, 250
    with relay_sidecar.Client(roomy.socket) as client:
        with client.session(timeout=120) as session:
            start = threading.Barrier(threads)

            def worker(n: int) -> List[concurrent.futures.Future]:
                start.wait(WITHIN)
                return [session.send(roomy.uuid, "offer", f"{n}:{i}") for i in range(each)]

            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                futures = [f for batch in pool.map(worker, range(threads)) for f in batch]
            assert outcomes(futures) == [None] * (threads * each)
            got = descriptions(session, threads * each)
    by_thread: dict = {}
    for text in got:
        n, i = text.split(":")
        by_thread.setdefault(int(n), []).append(int(i))
    assert by_thread == {n: list(range(each)) for n in range(threads)}


def test_a_session_outlives_a_killed_daemon(roomy: Daemon, relay: Relay) -> None:
    with relay_sidecar.Client(roomy.socket) as client:
        with client.session(timeout=120) as session:
            assert outcomes([session.send(roomy.uuid, "offer", "warm")]) == [None]
            # Killed mid-stream: with the relay stopped, nothing sent now can
            # have been confirmed when the daemon dies.
            relay.process.send_signal(signal.SIGSTOP)
            try:
                before = [session.send(roomy.uuid, "offer", f"before {i}") for i in range(500)]
                assert roomy.process is not None
                os.kill(roomy.process.pid, signal.SIGKILL)
                roomy.process.wait()
            finally:
                relay.process.send_signal(signal.SIGCONT)
            during = [session.send(roomy.uuid, "offer", f"during {i}") for i in range(200)]
            roomy.start()
            after = [session.send(roomy.uuid, "offer", f"after {i}") for i in range(100)]

            # What the dead daemon had been given is unconfirmed; what it had
            # not went out on a fresh stream, as did everything later.
            sent = [f"before {i}" for i in range(500)] + [f"during {i}" for i in range(200)]
            settled = outcomes(before + during)
            unconfirmed = relay_sidecar.UnconfirmedError
            for outcome in settled:
                assert outcome is None or isinstance(outcome, unconfirmed), repr(outcome)
            assert isinstance(settled[0], unconfirmed), settled[0]
            assert outcomes(after) == [None] * 100
            ok = [text for text, outcome in zip(sent, settled) if outcome is None]
            ok += [f"after {i}" for i in range(100)]
            assert len(ok) > 700, "most were never written, so not lost"
            # The subscription resumed on the new daemon, and every message
            # settled OK arrives there, in order.
            wanted, seen = set(ok), []
            for message in session:
                if message.description in wanted:
                    seen.append(message.description)
                if message.description == "after 99":
                    break
            assert seen == ok
            assert session.resumed == 1


def test_send_waits_for_room_and_close_settles_everything(
    roomy: Daemon, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 8
    monkeypatch.setattr(relay_sidecar.client, "SESSION_IN_FLIGHT", bound)
    with relay_sidecar.Client(roomy.socket) as client:
        session = client.session(timeout=60)
        # A stopped relay confirms nothing: every send stays unsettled.
        relay.process.send_signal(signal.SIGSTOP)
        try:
            futures = [session.send(roomy.uuid, "offer", str(i)) for i in range(bound)]
            assert session.unsettled == bound
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                one_more = pool.submit(session.send, roomy.uuid, "offer", "one more")
                # Negative check: the send must still be waiting for room.
                with pytest.raises(concurrent.futures.TimeoutError):
                    one_more.result(0.5)
                assert session.unsettled == bound
                relay.process.send_signal(signal.SIGCONT)
                last = one_more.result(WITHIN)
            assert outcomes([*futures, last]) == [None] * (bound + 1)

            relay.process.send_signal(signal.SIGSTOP)
            waiting = [session.send(roomy.uuid, "offer", f"late {i}") for i in range(3)]
            session.close(timeout=0.5)
            for outcome in outcomes(waiting):
                # Written (UNKNOWN), or not yet taken by gRPC (UNAVAILABLE).
                assert isinstance(
                    outcome, (relay_sidecar.UnconfirmedError, relay_sidecar.UnavailableError)
                ), repr(outcome)
            assert session.unsettled == 0
            with pytest.raises(RuntimeError, match="closed"):
                session.send(roomy.uuid, "offer", "after close")
            assert list(session) == []
        finally:
            relay.process.send_signal(signal.SIGCONT)


def test_aio_two_thousand_sends_arrive_in_order(roomy: Daemon) -> None:
    count = 2000

    async def main() -> None:
        async with relay_sidecar.aio.Client(roomy.socket) as client:
            async with await client.session(timeout=120) as session:
                pending = [await session.queue(roomy.uuid, "offer", str(i)) for i in range(count)]
                assert all(isinstance(f, asyncio.Future) for f in pending)
                results = await asyncio.wait_for(asyncio.gather(*pending), WITHIN)
                assert results == [None] * count
                await session.send(roomy.uuid, "answer", "awaited")
                seen = []
                async for message in session:
                    seen.append(message.description)
                    if len(seen) == count + 1:
                        break
                assert seen == [str(i) for i in range(count)] + ["awaited"]

    asyncio.run(asyncio.wait_for(main(), 90))


def test_aio_a_refused_message_fails_only_its_own_send(roomy: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(roomy.socket) as client:
            async with await client.session(timeout=60) as session:
                pending = [
                    await session.queue(roomy.uuid, "offer", "first"),
                    await session.queue(roomy.uuid, "greeting", "bad type"),
                    await session.queue(roomy.uuid, "offer", "x" * (MAX_MESSAGE_BYTES + 1)),
                    await session.queue(roomy.uuid, "answer", "second"),
                ]
                first, bad_type, too_big, second = await asyncio.gather(
                    *pending, return_exceptions=True
                )
                assert (first, second) == (None, None)
                assert isinstance(bad_type, relay_sidecar.InvalidArgumentError), bad_type
                assert "description_type" in bad_type.message
                assert isinstance(too_big, relay_sidecar.InvalidArgumentError), too_big
                with pytest.raises(relay_sidecar.InvalidArgumentError, match="peer_uuid"):
                    await session.send("not-a-uuid", "offer", "bad peer")
                await session.send(roomy.uuid, "offer", "third")
                seen = []
                async for message in session:
                    seen.append(message.description)
                    if len(seen) == 3:
                        break
                assert seen == ["first", "second", "third"]
            with pytest.raises(RuntimeError, match="closed"):
                await session.send(roomy.uuid, "offer", "after close")

    asyncio.run(asyncio.wait_for(main(), 60))


def test_unknown_status_numbers_are_protocol_errors() -> None:
    error = relay_sidecar.errors.from_code_number(3, "bad field")
    assert isinstance(error, relay_sidecar.InvalidArgumentError)
    assert str(error) == "invalid argument: bad field"
    unknown = relay_sidecar.errors.from_code_number(999, "?")
    assert isinstance(unknown, relay_sidecar.ProtocolError)
    assert relay_sidecar.SESSION_IN_FLIGHT == 1024
