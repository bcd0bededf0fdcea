"""relay-sidecar-endpoint: ProxyStore's own endpoint peering through the daemon.

Every endpoint here is a real process: ``relay-sidecar-endpoint start`` on a
"host" with the daemon, plain ``proxystore-endpoint start`` on "hosts" of
their own (each its own ``PROXYSTORE_HOME``), all on a real
``proxystore-relay``; workers reach them through ProxyStore's
``EndpointConnector`` and ``Store`` proxies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, TypeVar

import psutil
import pytest
from proxystore.connectors.endpoint import EndpointConnector, EndpointKey
from proxystore.endpoint.config import write_config
from proxystore.store import Store

import relay_sidecar
from relay_sidecar.endpoint import compat
from relay_sidecar.endpoint.errors import EndpointAlreadyRunningError
from relay_sidecar.endpoint.exclusive import claim
from relay_sidecar.proxystore import SidecarRelayClient
from support import (
    ENDPOINT_COMMAND_TIMEOUT,
    POLL_INTERVAL,
    Daemon,
    EndpointHost,
    Relay,
    free_port,
    log_tail,
    read_until,
)

#: One connector operation: up to 10 MiB over a peer connection between two
#: Python endpoints on a loaded 2-core machine takes seconds; a minute is a
#: failure guard (neither ProxyStore's HTTP client nor an endpoint's peer
#: request has a timeout of its own).
OP_TIMEOUT = 60.0
#: After the relay is back: the daemon and ProxyStore's RelayClient retry
#: from 1 s, doubling, so both are registered again within seconds.
RECOVERY_TIMEOUT = 60.0
#: The value sizes every exchange covers.
SIZES = (1, 1 << 20, 10 << 20)
RESOLVER = Path(__file__).with_name("resolve_proxies.py")
SUBCOMMANDS = ("configure", "start", "stop", "list", "remove", "version", "help")
T = TypeVar("T")


def bounded(fn: Callable[..., T], *args: Any, timeout: float = OP_TIMEOUT) -> T:
    """``fn(*args)``, failing the test when it takes longer than ``timeout``."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"{fn.__name__}{args!r:.80} took over {timeout:g}s") from None
    finally:
        pool.shutdown(wait=False)


def eventually(fn: Callable[[], T], timeout: float = RECOVERY_TIMEOUT) -> T:
    """``fn()`` retried until it succeeds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {timeout:g}s: {e!r}") from e
        time.sleep(POLL_INTERVAL * 10)


async def eventually_async(make: Callable[[], Awaitable[T]]) -> T:
    """``await make()`` retried until it succeeds, for at most ``OP_TIMEOUT``."""
    deadline = time.monotonic() + OP_TIMEOUT
    while True:
        try:
            return await make()
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(POLL_INTERVAL)


def connector(host: EndpointHost, *endpoints: uuid.UUID) -> EndpointConnector:
    return EndpointConnector([str(e) for e in endpoints], proxystore_dir=str(host.home))


def exchange(owner: EndpointConnector, other: EndpointConnector) -> None:
    """Put on ``owner``'s endpoint; get, exists and evict through ``other``'s."""
    for size in SIZES:
        data = os.urandom(size)
        key = bounded(owner.put, data)
        assert key.endpoint_id == str(owner.endpoint_uuid)
        got = bounded(other.get, key)
        assert got is not None and len(got) == size and got == data, f"{size} bytes"
        assert bounded(other.exists, key)
        bounded(other.evict, key)
        assert not bounded(other.exists, key)
        assert not bounded(owner.exists, key)


def proxies_resolve_across(
    creator: EndpointHost, resolver: EndpointHost, endpoints: List[uuid.UUID], tmp: Path
) -> None:
    """``Store`` proxies made on ``creator`` resolve on ``resolver``, whose
    endpoint fetches them from ``creator``'s."""
    # proxystore_dir=None, as ProxyStore recommends: each host's connector
    # finds that host's endpoint through $PROXYSTORE_HOME.
    previous = os.environ.get("PROXYSTORE_HOME")
    os.environ["PROXYSTORE_HOME"] = str(creator.home)
    try:
        store = Store(
            f"store-{uuid.uuid4().hex[:8]}", EndpointConnector([str(e) for e in endpoints])
        )
    finally:
        if previous is None:
            del os.environ["PROXYSTORE_HOME"]
        else:
            os.environ["PROXYSTORE_HOME"] = previous
    with store:
        values = [os.urandom(size) for size in SIZES]
        proxies = [bounded(store.proxy, value) for value in values]
        path = tmp / f"proxies-{uuid.uuid4().hex[:8]}.pickle"
        path.write_bytes(pickle.dumps(proxies))
        result = subprocess.run(
            [sys.executable, str(RESOLVER), str(path)],
            env=resolver.env,
            capture_output=True,
            text=True,
            timeout=OP_TIMEOUT * len(SIZES),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout) == [
            [len(v), hashlib.sha256(v).hexdigest()] for v in values
        ]


def wait_registered_again(daemon: Daemon, reconnects: int) -> None:
    """Waits (bounded) until the daemon has registered again after losing the
    relay ``reconnects`` times in all."""
    with relay_sidecar.Client(daemon.socket) as client:
        with client.watch_status(timeout=RECOVERY_TIMEOUT) as statuses:
            for status in statuses:
                if (
                    status.state is relay_sidecar.ConnectionState.REGISTERED
                    and status.counters.reconnects >= reconnects
                ):
                    return
    raise AssertionError("the daemon's status stream ended before it registered again")


@pytest.fixture
def hosts() -> Iterator[List[EndpointHost]]:
    """Hosts a test creates (append to it); their endpoints end with the test."""
    made: List[EndpointHost] = []
    yield made
    for host in made:
        host.kill_all()


def test_help_works_without_a_daemon(tmp_path: Path) -> None:
    host = EndpointHost(tmp_path / "home", socket=str(tmp_path / "no-daemon.sock"))
    top = host.sidecar("--help")
    for command in SUBCOMMANDS:
        assert command in top.stdout
    for command in SUBCOMMANDS:
        result = host.sidecar(command, "--help")
        assert result.stdout.startswith(f"usage: relay-sidecar-endpoint {command}"), result.stdout
    assert "0.6 to 1.1" in host.sidecar("version").stdout


def test_configure_fails_clearly_without_a_daemon(tmp_path: Path) -> None:
    socket = str(tmp_path / "no-daemon.sock")
    host = EndpointHost(tmp_path / "home", socket=socket)
    result = host.sidecar("configure", "a", check=False)
    assert result.returncode == 1
    assert f"no relay-sidecar daemon answers at {socket}" in result.stderr
    assert not (host.home / "a").exists()


def test_supported_proxystore_versions() -> None:
    for supported in ("0.6.0", "0.6.5", "0.7.1", "1.0.0", "1.1.0", "1.1.3.post1"):
        assert compat.check_proxystore(supported)
    for unsupported in ("0.5.2", "1.2.0", "2.0.0"):
        with pytest.raises(compat.UnsupportedProxyStoreError, match="0.6 to 1.1.*" + unsupported):
            compat.check_proxystore(unsupported)
    assert compat.check_proxystore() == compat.check_proxystore(compat.installed_version())


def test_configure_writes_the_daemons_identity(
    daemon: Daemon, relay: Relay, tmp_path: Path
) -> None:
    host = EndpointHost(tmp_path / "home", socket=daemon.socket)
    result = host.sidecar("configure", "a", "--host", "127.0.0.1", "--persist")
    assert "relay-sidecar-endpoint start a" in result.stdout
    assert "displace the daemon" in result.stderr

    config = host.config("a")
    assert uuid.UUID(config.uuid) == daemon.uuid
    assert config.relay.address == relay.url
    assert config.relay.auth.method is None
    assert config.storage.database_path == str(host.home / "a" / "blobs.db")
    assert (config.host, config.host_type) == ("127.0.0.1", "static")
    # ProxyStore's own command sees an ordinary endpoint.
    listed = host.proxystore("list").stdout
    assert "a" in listed and "STOPPED" in listed and str(daemon.uuid) in listed

    again = host.sidecar("configure", "a", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    second = host.sidecar("configure", "b", check=False)
    assert second.returncode == 1
    assert "endpoint a is already this daemon's endpoint" in second.stderr
    assert not (host.home / "b").exists()


def test_claim_holds_the_daemon_alone(daemon: Daemon) -> None:
    async def main() -> None:
        first = await asyncio.wait_for(claim(daemon.socket), OP_TIMEOUT)
        assert first.uuid == daemon.uuid
        with pytest.raises(EndpointAlreadyRunningError, match=daemon.socket):
            await asyncio.wait_for(claim(daemon.socket), OP_TIMEOUT)
        # Another PeerManager's default client would share the identity too.
        with pytest.raises(relay_sidecar.AlreadyExistsError):
            await asyncio.wait_for(SidecarRelayClient(socket_path=daemon.socket).connect(), OP_TIMEOUT)
        await first.close()
        # Free again once the daemon has seen the holder's stream end.
        again = await asyncio.wait_for(eventually_async(lambda: claim(daemon.socket)), OP_TIMEOUT)
        await again.close()

    asyncio.run(main())


def test_start_waits_for_the_daemon_and_refuses_what_would_break_it(
    daemon: Daemon, relay: Relay, tmp_path: Path, hosts: List[EndpointHost]
) -> None:
    host = EndpointHost(tmp_path / "home", socket=daemon.socket)
    hosts.append(host)

    # A plain ProxyStore endpoint config has an identity of its own.
    host.proxystore(
        "configure", "plain", "--host", "127.0.0.1", "--port", str(free_port()),
        "--relay-address", relay.url, "--no-relay-auth",
    )  # fmt: skip
    refused = host.sidecar("start", "plain", check=False)
    assert refused.returncode == 1
    assert host.config("plain").uuid in refused.stderr and str(daemon.uuid) in refused.stderr
    assert host.pid("plain") is None

    host.sidecar("configure", "a", "--host", "127.0.0.1")
    host.no_stun("a")
    # Started before the daemon, as a job script may: start waits for it.
    daemon.stop()
    starting = host.spawn("relay-sidecar-endpoint", "start", "a")
    try:
        read_until(starting, "Waiting up to 60s for the relay-sidecar daemon")
        daemon.start()
        out, err = starting.communicate(timeout=ENDPOINT_COMMAND_TIMEOUT)
    finally:
        starting.kill()
    assert starting.returncode == 0, out + err
    assert "displace the daemon" in err
    host.wait_serving("a")
    listed = host.sidecar("list").stdout
    assert any(line.split()[:2] == ["a", "RUNNING"] for line in listed.splitlines()), listed

    # A second endpoint on the same daemon: same uuid, as configure would
    # have refused to write it.
    twin = host.config("a")
    twin.name, twin.port = "twin", free_port()
    write_config(twin, str(host.home / "twin"))
    refused = host.sidecar("start", "twin", check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "already using the relay-sidecar daemon" in refused.stderr, refused.stderr
    assert host.pid("twin") is None
    host.wait_serving("a")

    again = host.sidecar("start", "a", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    removing = host.sidecar("remove", "a", check=False)
    assert removing.returncode == 1 and (host.home / "a").exists()

    # However the holder ends, the daemon frees the endpoint's place: here
    # it is killed outright, leaving its pid file behind, which start clears.
    pid = host.pid("a")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # Dead once its parent (init, for a detached endpoint) has reaped it,
    # which here can take a few seconds; ProxyStore counts a zombie as alive.
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid):
        assert time.monotonic() < deadline, f"endpoint {pid} still exists 30 s after SIGKILL"
        time.sleep(0.05)
    listed = host.sidecar("list").stdout
    assert any(line.split()[:2] == ["a", "HANGING"] for line in listed.splitlines()), listed
    host.sidecar("start", "a")
    host.wait_serving("a")
    assert host.pid("a") not in (None, pid)

    host.sidecar("stop", "a")
    assert host.pid("a") is None
    host.sidecar("remove", "a")
    assert not (host.home / "a").exists()


def test_endpoints_on_two_hosts(tmp_path: Path, hosts: List[EndpointHost]) -> None:
    relay = Relay(tmp_path)  # this test's own: it is killed
    daemon = Daemon(relay.url, name="host-a")
    try:
        run_two_hosts(relay, daemon, tmp_path, hosts)
    except BaseException:
        print(f"daemon log:\n{log_tail(daemon.log)}")
        for host in hosts:
            for log in host.home.glob("*/log.txt"):
                print(f"{log}:\n{log_tail(log, 60)}")
        raise
    finally:
        for host in hosts:
            host.kill_all()
        hosts.clear()
        daemon.close()
        relay.stop()


def run_two_hosts(relay: Relay, daemon: Daemon, tmp: Path, hosts: List[EndpointHost]) -> None:
    started = time.monotonic()
    timings: Dict[str, float] = {}

    def lap(what: str) -> None:
        timings[what] = time.monotonic() - started - sum(timings.values())

    host_a = EndpointHost(tmp / "host-a", socket=daemon.socket)
    host_b = EndpointHost(tmp / "host-b")
    hosts.extend([host_a, host_b])
    host_a.sidecar("configure", "a", "--host", "127.0.0.1", "--persist")
    host_a.no_stun("a")
    host_a.sidecar("start", "a")
    host_a.wait_serving("a")
    a, b = uuid.UUID(host_a.config("a").uuid), host_b.start_plain("b", relay.url)
    assert a == daemon.uuid
    lap("start both")

    on_a, on_b = connector(host_a, a, b), connector(host_b, a, b)
    assert (on_a.endpoint_uuid, on_b.endpoint_uuid) == (a, b)
    exchange(on_a, on_b)
    exchange(on_b, on_a)
    lap("exchange")
    proxies_resolve_across(host_a, host_b, [a, b], tmp)
    proxies_resolve_across(host_b, host_a, [a, b], tmp)
    lap("proxies")

    # The endpoint on A restarts; B's next get reaches the new one, which
    # kept its data (--persist).
    kept = os.urandom(SIZES[1])
    kept_key = bounded(on_a.put, kept)
    host_a.sidecar("stop", "a")
    host_a.sidecar("start", "a")
    assert bounded(on_b.get, kept_key) == kept
    assert bounded(on_b.get, EndpointKey(object_id="never-put", endpoint_id=str(a))) is None
    exchange(on_b, on_a)
    lap("endpoint restart")

    # The relay goes away and comes back while both endpoints run. Stopped,
    # not killed: killed, it can take ProxyStore's own RelayClient (B's) down
    # with it (see the SIGKILL below).
    relay.stop()
    relay.start()
    wait_registered_again(daemon, reconnects=1)
    exchange(on_a, on_b)
    exchange(on_b, on_a)
    proxies_resolve_across(host_b, host_a, [a, b], tmp)
    lap("relay restart")

    # Killed: the daemon registers again and a newcomer reaches A through
    # the relay. (B is left alone: ProxyStore 1.1's RelayClient may reconnect
    # into the dying relay's listen backlog, fail its handshake with an error
    # its reconnect task does not catch, and end its endpoint's process.)
    relay.kill()
    relay.start()
    wait_registered_again(daemon, reconnects=2)
    host_c = EndpointHost(tmp / "host-c")
    hosts.append(host_c)
    c = host_c.start_plain("c", relay.url)
    on_c = connector(host_c, a, c)
    exchange(on_a, on_c)
    exchange(on_c, on_a)
    lap("relay killed")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
