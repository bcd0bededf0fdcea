"""Test support: the real ProxyStore relay, the real daemon, a remote
ProxyStore peer, and "hosts" running real ProxyStore endpoints, each started
here and waited for with bounded polls.

The relay is ``proxystore-relay`` from this interpreter's environment; the
daemon is ``$RELAY_SIDECAR_BIN``, else ``debug/relay-sidecar`` under Cargo's
target directory (``$CARGO_TARGET_DIR``, else ``target`` in the repository;
``cargo build -p relay-sidecar`` makes it). A missing binary
fails the tests; nothing here skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Coroutine, Optional, TypeVar

import relay_sidecar

REPO_ROOT = Path(__file__).resolve().parents[3]
#: How long a relay or the daemon gets to come up and register.
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
T = TypeVar("T")


def daemon_binary() -> Path:
    """The daemon to test; raises with instructions when it is missing."""
    configured = os.environ.get("RELAY_SIDECAR_BIN")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    path = Path(configured) if configured else target / "debug" / "relay-sidecar"
    if not (path.is_file() and os.access(path, os.X_OK)):
        how = (
            "RELAY_SIDECAR_BIN points at it"
            if configured
            else "build it with `cargo build -p relay-sidecar`, or set RELAY_SIDECAR_BIN"
        )
        raise RuntimeError(f"the relay-sidecar daemon binary is missing: {path} ({how})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text[-lines:])


class Relay:
    """A real ``proxystore-relay`` on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log = workdir / "relay.log"
        self.executable = Path(sys.executable).parent / "proxystore-relay"
        if not self.executable.exists():
            raise RuntimeError(
                f"{self.executable} is missing: install proxystore[endpoints] into this venv"
            )
        self.start()

    def start(self) -> None:
        """Starts the relay (again, on the same port) and waits until it
        accepts connections."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.executable), "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxystore-relay exited:\n{log_tail(self.log)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"proxystore-relay did not accept connections on {self.url} "
                        f"within {READY_TIMEOUT}s:\n{log_tail(self.log)}"
                    ) from None
                time.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL: the relay vanishes without closing its connections."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def daemon_env() -> dict:
    """This environment without RELAY_SIDECAR_* (the daemon reads those as
    config, and rejects unknown ones)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_SIDECAR_")}


class Daemon:
    """The real relay-sidecar daemon, registered with ``relay_url``.

    The socket lives in a short temporary directory (Unix socket paths are
    limited to about 100 bytes, which pytest's tmp_path can exceed).
    """

    def __init__(
        self, relay_url: str, name: str = "py-sdk-test", settings: Optional[dict] = None
    ) -> None:
        """``settings``: more daemon settings, as ``{"send_timeout": "2s"}``."""
        self.binary = daemon_binary()
        self.settings = {f"RELAY_SIDECAR_{k.upper()}": v for k, v in (settings or {}).items()}
        self.relay_url = relay_url
        self.name = name
        self.uuid = uuid.uuid4()
        self.dir = Path(tempfile.mkdtemp(prefix="rsd-py-"))
        self.socket = str(self.dir / "relay.sock")
        self.log = self.dir / "daemon.log"
        self.process: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        """Starts the daemon (again) and waits until it is REGISTERED."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "--relay-url",
                    self.relay_url,
                    "--socket",
                    self.socket,
                    "--state-dir",
                    str(self.dir / "state"),
                    "--name",
                    self.name,
                    "--uuid",
                    str(self.uuid),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**daemon_env(), **self.settings},
            )
        try:
            self.wait_registered()
        except BaseException:
            self.stop()
            raise

    def fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"relay-sidecar {what}; its log:\n{log_tail(self.log)}")

    def wait_registered(self) -> relay_sidecar.Status:
        """Waits (bounded) for the socket, then for REGISTERED through the
        SDK's ``watch_status()``."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.fail(f"exited with {self.process.returncode}")
            try:
                client = relay_sidecar.Client(self.socket)
                break
            except relay_sidecar.ConnectError:
                if time.monotonic() > deadline:
                    raise self.fail(f"did not serve {self.socket} in {READY_TIMEOUT}s") from None
                time.sleep(POLL_INTERVAL)
        with client:
            while True:
                try:
                    with client.watch_status(timeout=deadline - time.monotonic()) as statuses:
                        for status in statuses:
                            if status.state is relay_sidecar.ConnectionState.REGISTERED:
                                return status
                except relay_sidecar.UnavailableError as e:
                    # gRPC shares a connection per socket path within a process:
                    # another client's attempts on the previous daemon's socket
                    # may leave it in backoff for a moment (2 s at most, CHANNEL_OPTIONS).
                    if time.monotonic() > deadline:
                        raise self.fail(f"did not register in {READY_TIMEOUT}s ({e})") from None
                    time.sleep(POLL_INTERVAL)
                    continue
                except relay_sidecar.RelaySidecarError as e:
                    raise self.fail(f"did not register in {READY_TIMEOUT}s ({e})") from None
                raise self.fail("ended its status stream before it registered")

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not stopped within 10 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class LoopThread:
    """An asyncio loop on a thread, for driving ProxyStore's async relay
    client from blocking tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


#: The most one endpoint command may take: ProxyStore's imports take seconds
#: on a loaded machine, and ``start`` also waits for the endpoint to serve.
ENDPOINT_COMMAND_TIMEOUT = 120.0
#: How long a stopped endpoint process gets after SIGTERM before SIGKILL.
ENDPOINT_STOP_GRACE = 5.0


class EndpointHost:
    """One "host" of ProxyStore endpoints: its own ``PROXYSTORE_HOME`` (the
    endpoints ``EndpointConnector`` finds there) and, for a host with a
    daemon, ``RELAY_SIDECAR_SOCKET``. Runs ``relay-sidecar-endpoint`` and
    ``proxystore-endpoint`` from this interpreter's environment."""

    def __init__(self, home: Path, socket: Optional[str] = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**daemon_env(), "PROXYSTORE_HOME": str(home)}
        if socket is not None:
            self.env["RELAY_SIDECAR_SOCKET"] = socket

    def run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs ``program`` (from this venv's bin) with this host's environment."""
        executable = Path(sys.executable).parent / program
        if not executable.exists():
            raise RuntimeError(f"{executable} is missing: pip install ./client-sdk/python")
        result = subprocess.run(
            [str(executable), *args],
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ENDPOINT_COMMAND_TIMEOUT,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{program} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def spawn(self, program: str, *args: str) -> subprocess.Popen:
        """Starts ``program`` with this host's environment, its output piped."""
        return subprocess.Popen(
            [str(Path(sys.executable).parent / program), *args],
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def sidecar(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("relay-sidecar-endpoint", *args, check=check)

    def proxystore(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("proxystore-endpoint", *args, check=check)

    def config(self, name: str) -> Any:
        from proxystore.endpoint.config import read_config

        return read_config(str(self.home / name))

    def no_stun(self, name: str) -> None:
        """Sets the endpoint's ICE servers to none: host candidates only, so
        peer connections form at once on a machine without internet."""
        from proxystore.endpoint.config import write_config

        config = self.config(name)
        config.relay.ice_servers = []
        write_config(config, str(self.home / name))

    def start_plain(self, name: str, relay_url: str) -> uuid.UUID:
        """Configures and starts a plain ProxyStore endpoint on loopback,
        without STUN servers; its uuid once it serves."""
        self.proxystore(
            "configure", name, "--host", "127.0.0.1", "--port", str(free_port()),
            "--relay-address", relay_url, "--no-relay-auth",
        )  # fmt: skip
        self.no_stun(name)
        self.proxystore("start", name)
        self.wait_serving(name)
        return uuid.UUID(self.config(name).uuid)

    def address(self, name: str) -> str:
        config = self.config(name)
        return f"http://{config.host}:{config.port}"

    def wait_serving(self, name: str) -> None:
        """Waits (bounded) until the endpoint answers with its config's uuid."""
        import json
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + READY_TIMEOUT
        expected = uuid.UUID(self.config(name).uuid)
        while True:
            try:
                with direct.open(f"{self.address(name)}/endpoint", timeout=1) as response:
                    if uuid.UUID(json.load(response)["uuid"]) == expected:
                        return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                log = self.home / name / "log.txt"
                raise RuntimeError(
                    f"endpoint {name} did not serve in {READY_TIMEOUT}s:\n{log_tail(log)}"
                )
            time.sleep(POLL_INTERVAL)

    def pid(self, name: str) -> Optional[int]:
        """The pid in the endpoint's pid file, if it has one."""
        try:
            return int((self.home / name / "daemon.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_all(self) -> None:
        """Ends every endpoint process this host's pid files name (all started
        by the test): SIGTERM, then SIGKILL after a grace period."""
        for pid_file in self.home.glob("*/daemon.pid"):
            pid = self.pid(pid_file.parent.name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + ENDPOINT_STOP_GRACE
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(POLL_INTERVAL)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def read_until(process: subprocess.Popen, text: str, timeout: float = READY_TIMEOUT) -> str:
    """Reads ``process``'s stdout (bounded) up to a line holding ``text``."""
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return "".join(seen)
    raise AssertionError(f"no line with {text!r} in {timeout}s; saw:\n{''.join(seen)}")
PEER_PROCESS = Path(__file__).with_name("peer_process.py")


class PeerProcess:
    """``peer_process.py`` in a child process: PeerManagers on the daemon
    (``"sidecar"``) or plain ProxyStore ones on the relay (``"native"``),
    driven by commands; see that script for the protocol.

    ``events`` keeps every event by command id; ``returncode`` tells whether
    the process died (a ProxyStore background task that fails ends it).
    """

    def __init__(self, side: str, target: str, log: Path, *args: str) -> None:
        self.side, self.target, self.log, self.args = side, target, log, args
        self.process: Optional[asyncio.subprocess.Process] = None
        self.uuids: list = []
        self.workers: list = []
        self._events: dict = {}
        self._waiters: dict = {}
        self._next_id = 0
        self._reader: Optional[asyncio.Task] = None

    async def start(self, timeout: float = READY_TIMEOUT) -> "PeerProcess":
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PEER_PROCESS),
                self.side,
                self.target,
                *self.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        self._reader = asyncio.ensure_future(self._read())
        ready = await self.wait("ready", timeout)
        self.uuids = [uuid.UUID(u) for u in ready["uuids"]]
        self.workers = ready["workers"]
        return self

    @property
    def uuid(self) -> uuid.UUID:
        return self.uuids[0]

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            key = event.get("id", event["event"])
            self._events.setdefault(key, []).append(event)
            waiter = self._waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def command(self, cmd: str, **fields: Any) -> str:
        """Sends a command; returns its id for ``wait``."""
        assert self.process is not None and self.process.stdin is not None
        self._next_id += 1
        ident = f"{cmd}-{self._next_id}"
        line = json.dumps({"cmd": cmd, "id": ident, **fields}) + "\n"
        self.process.stdin.write(line.encode())
        return ident

    def events(self, key: str) -> list:
        return list(self._events.get(key, []))

    async def wait(self, key: str, timeout: float = 60, count: int = 1) -> dict:
        """The ``count``-th event for ``key`` (a command id or an event name);
        fails with the process's log if it does not come or the process
        dies."""
        deadline = time.monotonic() + timeout
        while len(self._events.get(key, [])) < count:
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(
                    f"{self.side} process exited with {self.process.returncode} before "
                    f"{key!r}:\n{log_tail(self.log)}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {key!r} from the {self.side} process within {timeout}s:\n"
                    f"{log_tail(self.log)}"
                )
            waiter = self._waiters.setdefault(key, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiter), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return self._events[key][count - 1]

    async def run(self, cmd: str, timeout: float = 60, **fields: Any) -> dict:
        """A command and its (first) event."""
        return await self.wait(self.command(cmd, **fields), timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def quit(self, timeout: float = 30) -> int:
        """Asks the process to close its managers and exit; its exit status."""
        assert self.process is not None
        if self.alive():
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"cmd": "quit"}\n')
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(
                    f"{self.side} process did not quit in {timeout}s:\n{log_tail(self.log)}"
                ) from None
        if self._reader is not None:
            await self._reader
        return self.process.returncode

    async def kill(self) -> None:
        if self.process is not None and self.alive():
            self.process.kill()
            await self.process.wait()
