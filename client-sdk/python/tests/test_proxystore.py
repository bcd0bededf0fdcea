"""relay_sidecar.proxystore.SidecarRelayClient: ProxyStore's own PeerManager,
unchanged, on the daemon, establishing real WebRTC peer connections with a
PeerManager on ProxyStore's own RelayClient."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import websockets.exceptions
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.exceptions import RelayNotConnectedError, RelayRegistrationError
from proxystore.p2p.relay.messages import (
    PeerConnectionRequest,
    RelayMessageEncodeError,
    RelayRegistrationRequest,
)

import relay_sidecar
from relay_sidecar.proxystore import (
    IdentityMismatchError,
    MessageRefusedError,
    PeerManager,
    SidecarRelayClient,
)
from support import Daemon, Relay

#: Bound on each step; on loopback the whole exchange takes well under a second.
STEP_TIMEOUT = 10


def test_peer_managers_exchange_bytes_over_webrtc(daemon: Daemon, relay: Relay) -> None:
    async def main() -> float:
        # ice_servers=[]: host candidates only, so this runs offline.
        sidecar_side = PeerManager(SidecarRelayClient(socket_path=daemon.socket), ice_servers=[])
        native_side = PeerManager(RelayClient(relay.url, client_name="native"), ice_servers=[])
        async with sidecar_side, native_side:
            assert sidecar_side.uuid == daemon.uuid
            started = time.perf_counter()

            # The sidecar side offers; the native side answers.
            await asyncio.wait_for(sidecar_side.send(native_side.uuid, b"to native"), STEP_TIMEOUT)
            source, data = await asyncio.wait_for(native_side.recv(), STEP_TIMEOUT)
            assert (source, data) == (daemon.uuid, b"to native")

            # Back over the same peer connection.
            await asyncio.wait_for(native_side.send(daemon.uuid, b"to sidecar"), STEP_TIMEOUT)
            source, data = await asyncio.wait_for(sidecar_side.recv(), STEP_TIMEOUT)
            assert (source, data) == (native_side.uuid, b"to sidecar")
            elapsed = time.perf_counter() - started

            # The daemon carried the offer and the answer, nothing more.
            async with relay_sidecar.aio.Client(daemon.socket) as client:
                counters = (await client.status()).counters
            assert (counters.sent, counters.received) == (1, 1)
        return elapsed

    elapsed = asyncio.run(main())
    print(f"peer connection established and used both ways in {elapsed * 1000:.0f} ms")


def test_the_native_side_can_offer_too(daemon: Daemon, relay: Relay) -> None:
    async def main() -> None:
        sidecar_side = PeerManager(SidecarRelayClient(socket_path=daemon.socket), ice_servers=[])
        native_side = PeerManager(RelayClient(relay.url), ice_servers=[])
        async with sidecar_side, native_side:
            await asyncio.wait_for(native_side.send(daemon.uuid, "text"), STEP_TIMEOUT)
            assert await asyncio.wait_for(sidecar_side.recv(), STEP_TIMEOUT) == (
                native_side.uuid,
                "text",
            )
            await asyncio.wait_for(
                sidecar_side.send(native_side.uuid, b"\x00" * 100_000), STEP_TIMEOUT
            )
            assert await asyncio.wait_for(native_side.recv(), STEP_TIMEOUT) == (
                daemon.uuid,
                b"\x00" * 100_000,
            )

    asyncio.run(main())


def test_relay_client_interface(daemon: Daemon, relay: Relay) -> None:
    async def main() -> None:
        client = SidecarRelayClient(socket_path=daemon.socket)
        # Known at once, as with ProxyStore's client: asked of the daemon.
        assert (client.uuid, client.name) == (daemon.uuid, daemon.name)
        async with client:
            assert (client.uuid, client.name) == (daemon.uuid, daemon.name)

            peer = RelayClient(relay.url, client_name="remote", reconnect_task=False)
            await peer.connect()
            try:
                await client.send(
                    PeerConnectionRequest(
                        source_uuid=client.uuid,
                        source_name=client.name,
                        peer_uuid=peer.uuid,
                        description_type="offer",
                        description="sdp?",
                    )
                )
                got = await asyncio.wait_for(peer.recv(), STEP_TIMEOUT)
                assert (got.source_uuid, got.description) == (daemon.uuid, "sdp?")
                await peer.send(
                    PeerConnectionRequest(
                        source_uuid=peer.uuid,
                        source_name="remote",
                        peer_uuid=daemon.uuid,
                        description_type="answer",
                        description="sdp!",
                    )
                )
                message = await asyncio.wait_for(client.recv(), STEP_TIMEOUT)
                assert message == PeerConnectionRequest(
                    source_uuid=peer.uuid,
                    source_name="remote",
                    peer_uuid=daemon.uuid,
                    description_type="answer",
                    description="sdp!",
                    error=None,
                )
            finally:
                await peer.close()

            nobody = uuid.uuid4()
            await client.send(
                PeerConnectionRequest(
                    source_uuid=client.uuid,
                    source_name=client.name,
                    peer_uuid=nobody,
                    description_type="offer",
                    description="lost",
                )
            )
            bounce = await asyncio.wait_for(client.recv(), STEP_TIMEOUT)
            assert isinstance(bounce, PeerConnectionRequest)
            assert (bounce.source_uuid, bounce.peer_uuid) == (daemon.uuid, nobody)
            assert isinstance(bounce.peer_uuid, uuid.UUID)
            assert bounce.error

            with pytest.raises(RelayMessageEncodeError):
                await client.send(RelayRegistrationRequest("x", uuid.uuid4()))
            with pytest.raises(relay_sidecar.InvalidArgumentError, match="description_type"):
                await client.send(
                    PeerConnectionRequest(
                        source_uuid=client.uuid,
                        source_name=client.name,
                        peer_uuid=nobody,
                        description_type="hello",  # type: ignore[arg-type]
                        description="",
                    )
                )

    asyncio.run(main())


def test_connect_fails_while_the_daemon_is_displaced(daemon: Daemon, relay: Relay) -> None:
    async def main() -> None:
        # Same uuid as the daemon: the relay displaces the daemon with 4004.
        impostor = RelayClient(relay.url, client_uuid=daemon.uuid, reconnect_task=False)
        async with relay_sidecar.aio.Client(daemon.socket) as client:
            async with await client.watch_status(timeout=STEP_TIMEOUT) as statuses:
                await impostor.connect()
                async for status in statuses:
                    if status.state is relay_sidecar.ConnectionState.FAILED:
                        break
            await impostor.close()

            with pytest.raises(RelayRegistrationError, match="4004|another|failed"):
                await SidecarRelayClient(socket_path=daemon.socket).connect()

            await client.reconnect()
            async with SidecarRelayClient(socket_path=daemon.socket, timeout=STEP_TIMEOUT) as sidecar:
                assert sidecar.uuid == daemon.uuid

    asyncio.run(main())


def test_recv_subscribes_again_after_a_daemon_restart(daemon: Daemon, relay: Relay) -> None:
    async def main() -> None:
        async with SidecarRelayClient(socket_path=daemon.socket) as client:
            receiving = asyncio.ensure_future(client.recv())
            await asyncio.sleep(0.1)
            await asyncio.get_running_loop().run_in_executor(None, daemon.stop)
            await asyncio.get_running_loop().run_in_executor(None, daemon.start)
            # Subscribed again: an offer while nobody is subscribed would be
            # refused (the daemon answers it, as if this host were away).
            async with relay_sidecar.aio.Client(daemon.socket) as observer:
                deadline = time.monotonic() + STEP_TIMEOUT
                while True:
                    assert time.monotonic() < deadline, "never subscribed again"
                    try:
                        if (await observer.status()).counters.subscribers > 0:
                            break
                    except relay_sidecar.UnavailableError:
                        # gRPC shares the connection attempt with the
                        # resuming client, which may still be failing
                        # against the old daemon's socket.
                        pass
                    await asyncio.sleep(0.02)

            peer = RelayClient(relay.url, client_name="remote", reconnect_task=False)
            await peer.connect()
            try:
                await peer.send(
                    PeerConnectionRequest(
                        source_uuid=peer.uuid,
                        source_name="remote",
                        peer_uuid=daemon.uuid,
                        description_type="offer",
                        description="after the restart",
                    )
                )
                message = await asyncio.wait_for(receiving, STEP_TIMEOUT)
            finally:
                await peer.close()
            assert (message.source_uuid, message.description) == (peer.uuid, "after the restart")

    asyncio.run(main())


def test_close_ends_a_pending_recv_and_a_later_call_connects_again(daemon: Daemon) -> None:
    async def main() -> None:
        client = SidecarRelayClient(socket_path=daemon.socket)
        await client.connect()
        receiving = asyncio.ensure_future(client.recv())
        await asyncio.sleep(0.05)
        await client.close()
        # What ProxyStore's own client raises: a PeerManager's loop ends.
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            await asyncio.wait_for(receiving, STEP_TIMEOUT)

        # As with ProxyStore's RelayClient, using it again reconnects.
        nobody = uuid.uuid4()
        await client.send(PeerConnectionRequest(daemon.uuid, daemon.name, nobody, "offer", "again"))
        bounce = await asyncio.wait_for(client.recv(), STEP_TIMEOUT)
        assert (bounce.peer_uuid, bounce.description) == (nobody, "again")
        await client.close()

    asyncio.run(main())


def test_an_exclusive_client_refuses_a_second_one_on_the_host(daemon: Daemon) -> None:
    async def main() -> None:
        first = SidecarRelayClient(socket_path=daemon.socket, group="endpoint", exclusive=True)
        async with first:
            with pytest.raises(relay_sidecar.AlreadyExistsError, match='"endpoint"'):
                await SidecarRelayClient(socket_path=daemon.socket, group="endpoint", exclusive=True).connect()
        # Closed: the group is free for the next one, once the daemon has seen
        # the stream end (it is on another connection).
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                async with SidecarRelayClient(socket_path=daemon.socket, group="endpoint", exclusive=True):
                    return
            except relay_sidecar.AlreadyExistsError:
                assert time.monotonic() < deadline, "the group was not freed"
                await asyncio.sleep(0.02)

    asyncio.run(main())


def test_it_takes_relay_clients_arguments_and_checks_them_against_the_daemon(
    daemon: Daemon, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario 6: a drop-in by signature; what was given is checked."""
    monkeypatch.setenv("RELAY_SIDECAR_SOCKET", daemon.socket)
    client = SidecarRelayClient(
        relay.url,
        client_name=daemon.name,
        client_uuid=daemon.uuid,
        extra_headers={"Authorization": "Bearer x"},
        reconnect_task=False,
        ssl_context=None,
        timeout=5,
        verify_certificate=False,
    )
    # Known at once, from the daemon (the socket from the environment).
    assert (client.uuid, client.name) == (daemon.uuid, daemon.name)
    # The same relay, spelled otherwise.
    SidecarRelayClient(relay.url.upper().replace("WS://", "ws://") + "/")

    with pytest.raises(ValueError, match="must start with ws:// or wss://"):
        SidecarRelayClient("http://relay.example.org")
    with pytest.raises(ValueError, match="socket_path="):
        SidecarRelayClient(daemon.socket)
    with pytest.raises(IdentityMismatchError, match="^address: ") as wrong_relay:
        SidecarRelayClient("wss://relay.example.org")
    assert isinstance(wrong_relay.value, RelayRegistrationError)
    assert isinstance(wrong_relay.value, ValueError)
    with pytest.raises(IdentityMismatchError, match="^client_uuid: "):
        SidecarRelayClient(client_uuid=uuid.uuid4())


def test_without_a_daemon_it_defers_and_raises_proxystores_errors(tmp_path) -> None:
    missing = str(tmp_path / "none.sock")
    client = SidecarRelayClient(socket_path=missing, timeout=1)
    with pytest.raises(RelayNotConnectedError, match="none.sock"):
        _ = client.uuid
    given = uuid.uuid4()
    assert SidecarRelayClient(socket_path=missing, client_uuid=given).uuid == given

    async def main() -> None:
        with pytest.raises(RelayNotConnectedError) as e:
            await client.connect(retry=False)
        assert isinstance(e.value, relay_sidecar.ConnectError)

    asyncio.run(main())


def test_refused_messages_raise_proxystores_encode_error(daemon: Daemon) -> None:
    async def main() -> None:
        async with SidecarRelayClient(socket_path=daemon.socket) as client:
            with pytest.raises(MessageRefusedError, match="description") as e:
                await client.send(
                    PeerConnectionRequest(
                        client.uuid, client.name, uuid.uuid4(), "offer", "x" * (2 << 20)
                    )
                )
            assert isinstance(e.value, RelayMessageEncodeError)
            assert isinstance(e.value, relay_sidecar.InvalidArgumentError)

    asyncio.run(main())
