"""Test support: the real ProxyStore relay, the real daemon, and a remote
ProxyStore peer, each started here and waited for with bounded polls.

The relay is ``proxystore-relay`` from this interpreter's environment; the
daemon is ``$RELAY_SIDECAR_BIN``, else ``debug/relay-sidecar`` under Cargo's
target directory (``$CARGO_TARGET_DIR``, else ``target`` in the repository;
``cargo build -p relay-sidecar`` makes it). A missing binary
fails the tests; nothing here skips.
"""

from __future__ import annotations

import asyncio
import os
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
        executable = Path(sys.executable).parent / "proxystore-relay"
        if not executable.exists():
            raise RuntimeError(
                f"{executable} is missing: install proxystore[endpoints] into this venv"
            )
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(executable), "--host", "127.0.0.1", "--port", str(self.port)],
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

    def __init__(self, relay_url: str, name: str = "py-sdk-test") -> None:
        self.binary = daemon_binary()
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
                env=daemon_env(),
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
            try:
                with client.watch_status(timeout=deadline - time.monotonic()) as statuses:
                    for status in statuses:
                        if status.state is relay_sidecar.ConnectionState.REGISTERED:
                            return status
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
