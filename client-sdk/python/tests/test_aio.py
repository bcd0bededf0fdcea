"""The asyncio client against the real daemon on the real ProxyStore relay,
with ProxyStore's own RelayClient as the remote peer. Each test drives its
own event loop with ``asyncio.run`` (no pytest plugin needed)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.messages import PeerConnectionRequest

import relay_sidecar
from relay_sidecar import ConnectionState, DescriptionType
from support import Daemon, Relay


def test_status_and_watch_status(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            status = await client.status()
            assert status.uuid == daemon.uuid
            assert status.state is ConnectionState.REGISTERED
            async with await client.watch_status(timeout=10) as statuses:
                async for update in statuses:
                    assert update.uuid == daemon.uuid
                    break

    asyncio.run(main())


def test_send_subscribe_and_bounce(daemon: Daemon, relay: Relay) -> None:
    async def main() -> None:
        peer = RelayClient(relay.url, client_name="remote", reconnect_task=False)
        await peer.connect()
        try:
            async with relay_sidecar.aio.Client(daemon.socket) as client:
                async with await client.subscribe() as messages:
                    await client.send(peer.uuid, "offer", "hello from asyncio")
                    got = await asyncio.wait_for(peer.recv(), 10)
                    assert isinstance(got, PeerConnectionRequest)
                    assert (got.source_uuid, got.description) == (
                        daemon.uuid,
                        "hello from asyncio",
                    )

                    await peer.send(
                        PeerConnectionRequest(
                            source_uuid=peer.uuid,
                            source_name=peer.name,
                            peer_uuid=daemon.uuid,
                            description_type="answer",
                            description="hello back",
                        )
                    )
                    message = await asyncio.wait_for(messages.__anext__(), 10)
                    assert (message.source_uuid, message.peer_uuid) == (peer.uuid, daemon.uuid)
                    assert (message.kind, message.description) == (
                        DescriptionType.ANSWER,
                        "hello back",
                    )
                    assert not message.bounced

                    nobody = uuid.uuid4()
                    await client.send(nobody, DescriptionType.ANSWER, "lost")
                    bounce = await asyncio.wait_for(messages.__anext__(), 10)
                    assert bounce.bounced and bounce.error
                    assert (bounce.source_uuid, bounce.peer_uuid) == (daemon.uuid, nobody)
        finally:
            await peer.close()

    asyncio.run(main())


def test_bad_uuid_raises_invalid_argument(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            with pytest.raises(relay_sidecar.InvalidArgumentError, match="peer_uuid") as err:
                await client.send("1234", "offer", "x")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(relay_sidecar.InvalidArgumentError, match="description"):
                await client.send(uuid.uuid4(), "offer", "x" * (2 << 20))
            assert (await client.status()).counters.sent == 0

    asyncio.run(main())


def test_reconnect(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            async with await client.watch_status(timeout=20) as statuses:
                first = await statuses.__anext__()
                assert first.state is ConnectionState.REGISTERED
                await client.reconnect()
                seen = []
                async for status in statuses:
                    seen.append(status.state)
                    if status.state is ConnectionState.REGISTERED:
                        break
            assert seen[0] is not ConnectionState.REGISTERED and seen[-1] is (
                ConnectionState.REGISTERED
            ), seen
            assert (await client.status()).counters.reconnects == 1

    asyncio.run(main())


def test_cancelled_subscription_stops_iteration(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            messages = await client.subscribe(group="g")
            reader = asyncio.ensure_future(messages.__anext__())
            await asyncio.sleep(0.05)
            messages.cancel()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(reader, 5)
            assert [m async for m in messages] == []

    asyncio.run(main())


def test_missing_socket_is_a_connect_error(tmp_path) -> None:
    with pytest.raises(relay_sidecar.ConnectError, match="absent.sock"):
        relay_sidecar.aio.Client(tmp_path / "absent.sock")


def test_a_subscription_resumes_after_the_daemon_restarts(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            async with await client.subscribe(timeout=60) as messages:
                await asyncio.get_running_loop().run_in_executor(None, daemon.stop)
                await asyncio.get_running_loop().run_in_executor(None, daemon.start)
                await client.send(daemon.uuid, "offer", "after the restart")
                message = await messages.__anext__()
                assert message.description == "after the restart"
                assert messages.resumed == 1

    asyncio.run(main())


def test_a_daemon_gone_for_good_fails_the_loop(daemon: Daemon) -> None:
    async def main() -> None:
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            messages = await client.subscribe(timeout=60, resume=1)
            await asyncio.get_running_loop().run_in_executor(None, daemon.stop)
            with pytest.raises(relay_sidecar.SubscriptionLostError) as lost:
                async for _ in messages:
                    pass
            assert "ended the stream" in str(lost.value) and "within 1s" in str(lost.value)

    asyncio.run(main())


def test_conversations_are_held_by_one_worker(daemon: Daemon) -> None:
    async def main() -> None:
        peer = uuid.uuid4()
        async with relay_sidecar.aio.Client(
            daemon.socket, worker="w1"
        ) as w1, relay_sidecar.aio.Client(daemon.socket, worker="w2") as w2:
            with pytest.raises(relay_sidecar.InvalidArgumentError, match="^invalid argument: conversation"):
                await w1.hold_conversation(peer)
            async with await w1.subscribe(conversations=True), await w2.subscribe(
                conversations=True
            ) as w2_messages:
                assert await w1.hold_conversation(peer) == 60.0
                with pytest.raises(relay_sidecar.AbortedError, match='"w1"'):
                    await w2.hold_conversation(peer)
                with pytest.raises(relay_sidecar.AbortedError, match='"w1"'):
                    await w2.send(peer, "offer", "mine?", conversation=True)
                assert not await w2.release_conversation(peer)
                assert await w1.release_conversation(peer)
                await w2.send(peer, "offer", "mine", conversation=True)
                # Nobody has that uuid: the relay's return reaches w2, and ends
                # the conversation.
                bounce = await asyncio.wait_for(w2_messages.__anext__(), 10)
                assert (bounce.bounced, bounce.peer_uuid) == (True, peer)
                counters = (await w1.status()).counters
                assert (counters.conversations, counters.conversation_conflicts) == (0, 2)

    asyncio.run(main())
