"""Fixtures: one real ProxyStore relay per session, a fresh daemon per test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

try:
    import relay_sidecar  # noqa: F401
except ImportError as e:  # pragma: no cover - environment check
    pytest.exit(
        f"relay_sidecar is not installed ({e}): pip install ./client-sdk/python",
        returncode=1,
    )

from support import Daemon, LoopThread, Relay, daemon_binary


def pytest_sessionstart(session: pytest.Session) -> None:
    # Fail the whole run at once, with the fix, when the daemon is not built.
    try:
        daemon_binary()
    except RuntimeError as e:
        pytest.exit(str(e), returncode=1)


@pytest.fixture(scope="session")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    relay = Relay(Path(tmp_path_factory.mktemp("relay")))
    yield relay
    relay.stop()


@pytest.fixture
def daemon(relay: Relay) -> Iterator[Daemon]:
    daemon = Daemon(relay.url)
    yield daemon
    daemon.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()
