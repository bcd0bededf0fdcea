"""The blocking client against the real daemon on the real ProxyStore relay,
with ProxyStore's own RelayClient as the remote peer."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.messages import PeerConnectionRequest

import relay_sidecar
from relay_sidecar import ConnectionState, DescriptionType
from support import Daemon, LoopThread, Relay


def test_status_reports_the_daemon(daemon: Daemon, relay: Relay) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        status = client.status()
    assert status.uuid == daemon.uuid
    assert isinstance(status.uuid, uuid.UUID)
    assert (status.name, status.relay_url) == (daemon.name, relay.url)
    assert (status.dialect, status.state) == ("current", ConnectionState.REGISTERED)
    assert (status.close_code, status.retry_in, status.detail) == (None, None, "")
    assert status.version


def test_send_and_subscribe_with_a_proxystore_peer(
    daemon: Daemon, relay: Relay, loop_thread: LoopThread
) -> None:
    async def make_peer() -> RelayClient:
        peer = RelayClient(relay.url, client_name="remote", reconnect_task=False)
        await peer.connect()
        return peer

    peer = loop_thread.run(make_peer())
    try:
        with relay_sidecar.Client(daemon.socket) as client, client.subscribe() as messages:
            client.send(peer.uuid, DescriptionType.OFFER, "hello from python")
            got = loop_thread.run(peer.recv(), timeout=10)
            assert isinstance(got, PeerConnectionRequest)
            assert (got.source_uuid, got.source_name) == (daemon.uuid, daemon.name)
            assert (got.description_type, got.description) == ("offer", "hello from python")

            reply = PeerConnectionRequest(
                source_uuid=peer.uuid,
                source_name=peer.name,
                peer_uuid=daemon.uuid,
                description_type="answer",
                description="hello back",
            )
            loop_thread.run(peer.send(reply))
            message = next(messages)
            assert message.source_uuid == peer.uuid
            assert message.peer_uuid == daemon.uuid
            assert (message.source_name, message.description) == ("remote", "hello back")
            assert (message.kind, message.error, message.bounced) == (
                DescriptionType.ANSWER,
                None,
                False,
            )
            counters = client.status().counters
            assert (counters.sent, counters.received, counters.subscribers) == (1, 1, 1)
    finally:
        loop_thread.run(peer.close())


def test_send_to_an_unknown_peer_bounces(daemon: Daemon) -> None:
    nobody = uuid.uuid4()
    with relay_sidecar.Client(daemon.socket) as client, client.subscribe() as messages:
        client.send(nobody, "offer", "anyone there?")
        bounce = next(messages)
    assert bounce.bounced
    assert bounce.error and str(nobody) in bounce.error
    assert (bounce.source_uuid, bounce.peer_uuid) == (daemon.uuid, nobody)
    assert bounce.description == "anyone there?"


def test_bad_input_raises_invalid_argument_naming_the_field(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        with pytest.raises(relay_sidecar.InvalidArgumentError, match="peer_uuid") as bad_uuid:
            client.send("not-a-uuid", "offer", "x")
        with pytest.raises(relay_sidecar.InvalidArgumentError, match="description_type"):
            client.send(uuid.uuid4(), "greeting", "x")
        assert client.status().counters.sent == 0
    assert bad_uuid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-a-uuid" in bad_uuid.value.message
    assert isinstance(bad_uuid.value, relay_sidecar.RelaySidecarError)


def test_reconnect_is_seen_in_watch_status(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        with client.watch_status(timeout=20) as statuses:
            assert next(statuses).state is ConnectionState.REGISTERED
            client.reconnect()
            seen = []
            for status in statuses:
                seen.append(status.state)
                if status.state is ConnectionState.REGISTERED:
                    break
        assert seen[0] is not ConnectionState.REGISTERED, seen
        assert seen[-1] is ConnectionState.REGISTERED, seen
        assert client.status().counters.reconnects == 1


def test_displaced_registration_fails_sends_until_reconnect(
    daemon: Daemon, relay: Relay, loop_thread: LoopThread
) -> None:
    async def impostor() -> RelayClient:
        # Same uuid as the daemon: the relay displaces the daemon with 4004.
        client = RelayClient(relay.url, client_uuid=daemon.uuid, reconnect_task=False)
        await client.connect()
        return client

    with relay_sidecar.Client(daemon.socket) as client:
        with client.watch_status(timeout=20) as statuses:
            other = loop_thread.run(impostor())
            try:
                failed = next(s for s in statuses if s.state is ConnectionState.FAILED)
            finally:
                loop_thread.run(other.close())
        assert failed.close_code == 4004
        with pytest.raises(relay_sidecar.FailedPreconditionError) as err:
            client.send(uuid.uuid4(), "offer", "x")
        assert err.value.message

        with client.watch_status(timeout=20) as statuses:
            client.reconnect()
            next(s for s in statuses if s.state is ConnectionState.REGISTERED)


def test_a_subscription_resumes_after_the_daemon_restarts(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        messages = client.subscribe(timeout=60)
        daemon.stop()
        daemon.start()
        # Sent while no subscription is open again: the daemon keeps it for
        # the first subscriber, the resumed one.
        client.send(daemon.uuid, "offer", "after the restart")
        message = next(messages)
        assert message.description == "after the restart"
        assert messages.resumed == 1
        messages.cancel()


def test_a_daemon_gone_for_good_fails_the_loop(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        messages = client.subscribe(timeout=60, resume=1)
        daemon.stop()
        with pytest.raises(relay_sidecar.SubscriptionLostError) as lost:
            for _ in messages:
                pass
        assert f"the daemon at {daemon.socket} ended the stream" in str(lost.value)
        assert "within 1s" in str(lost.value)
        assert isinstance(lost.value, relay_sidecar.UnavailableError)
        assert list(messages) == []


def test_a_daemon_back_as_another_peer_fails_the_loop(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as client:
        messages = client.subscribe(timeout=60)
        before = daemon.uuid
        daemon.stop()
        daemon.uuid = uuid.uuid4()
        daemon.start()
        with pytest.raises(relay_sidecar.SubscriptionLostError, match="another peer") as lost:
            next(messages)
        assert str(before) in str(lost.value) and str(daemon.uuid) in str(lost.value)


def test_a_worker_loop_exits_non_zero_when_its_daemon_is_gone(daemon: Daemon) -> None:
    # The shape of a worker: iterate until the daemon is gone.
    worker = (
        "import faulthandler, relay_sidecar, sys\n"
        # A hang shows where, rather than only that.
        "faulthandler.dump_traceback_later(30, exit=True)\n"
        f"with relay_sidecar.Client({daemon.socket!r}) as client:\n"
        "    with client.subscribe(resume=1) as messages:\n"
        "        print('subscribed', flush=True)\n"
        "        for m in messages:\n"
        "            pass\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", worker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "subscribed\n"
        daemon.stop()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "Timeout" not in stderr, f"the worker hung:\n{stderr}"
    assert process.returncode != 0
    assert "SubscriptionLostError" in stderr and "within 1s" in stderr, stderr


def test_missing_socket_is_a_connect_error(tmp_path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(relay_sidecar.ConnectError) as err:
        relay_sidecar.Client(path)
    assert err.value.path == str(path)
    assert err.value.cause.errno == errno.ENOENT
    assert str(path) in str(err.value)


def test_default_socket_path_follows_the_shared_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = relay_sidecar.socket_candidates
    assert candidates({"RELAY_SIDECAR_SOCKET": "/tmp/x.sock", "XDG_RUNTIME_DIR": "/r"}, 1000) == [
        "/tmp/x.sock"
    ]
    assert candidates({"RELAY_SIDECAR_SOCKET": "", "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == [
        "/run/user/1000/relay-sidecar/relay.sock",
        "/tmp/relay-sidecar-1000/relay.sock",
        "/run/relay-sidecar/relay.sock",
    ]
    # A client never reads RUNTIME_DIRECTORY: that is its own service's.
    assert candidates({"RUNTIME_DIRECTORY": "/run/a"}, 0) == ["/run/relay-sidecar/relay.sock"]
    assert candidates({"RELAY_SIDECAR_JOB": "77"}, 1000) == [
        "/tmp/relay-sidecar-1000/job-77/relay.sock"
    ]
    with pytest.raises(ValueError, match="job label"):
        candidates({"RELAY_SIDECAR_JOB": "../x"}, 1000)
    assert relay_sidecar.default_socket_path({"RELAY_SIDECAR_SOCKET": "/a.sock"}) == "/a.sock"

    monkeypatch.setenv(relay_sidecar.SOCKET_ENV, "/nonexistent/relay.sock")
    with pytest.raises(relay_sidecar.ConnectError, match="came from RELAY_SIDECAR_SOCKET") as err:
        relay_sidecar.Client()
    assert "/nonexistent/relay.sock (no such socket)" in str(err.value)


def test_no_daemon_names_every_path_tried(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(relay_sidecar.SOCKET_ENV, raising=False)
    monkeypatch.delenv(relay_sidecar.JOB_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    tried = relay_sidecar.socket_candidates()
    if any(os.path.exists(path) for path in tried):
        pytest.fail(f"a daemon's socket exists on this host: {tried}")
    with pytest.raises(relay_sidecar.ConnectError) as err:
        relay_sidecar.Client()
    message = str(err.value)
    for path in tried:
        assert f"{path} (no such socket)" in message
    assert "relay-sidecar start --relay-url URL" in message
    assert "RELAY_SIDECAR_SOCKET=PATH" in message
    assert [path for path, _ in err.value.tried] == tried


def test_an_exclusive_group_is_held_until_its_subscription_ends(daemon: Daemon) -> None:
    with relay_sidecar.Client(daemon.socket) as holder, relay_sidecar.Client(
        daemon.socket
    ) as other:
        held = holder.subscribe("endpoint", exclusive=True)
        for exclusive in (True, False):
            with pytest.raises(relay_sidecar.AlreadyExistsError, match='"endpoint"'):
                other.subscribe("endpoint", exclusive=exclusive)
        with pytest.raises(relay_sidecar.InvalidArgumentError, match="^invalid argument: exclusive"):
            other.subscribe(None, exclusive=True)
        held.cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                other.subscribe("endpoint", exclusive=True).cancel()
                break
            except relay_sidecar.AlreadyExistsError:
                assert time.monotonic() < deadline, "the group was not freed"
                time.sleep(0.02)
