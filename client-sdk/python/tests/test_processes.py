"""Two PeerManagers in two processes share the daemon's identity, each with
a different remote peer: both peer connections establish and carry data.

Each worker's offer claims the conversation with its remote peer, and the
daemon sends that peer's answer to the worker holding it. The order is
chosen so that a daemon handing answers out in turn fails every time: worker
a subscribes first, so taking turns would hand the answer to worker b's
offer to worker a.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Dict

from proxystore.p2p.manager import PeerManager
from proxystore.p2p.relay.client import RelayClient

from support import Daemon, Relay, log_tail

WORKER = Path(__file__).with_name("sidecar_worker.py")
STEP_TIMEOUT = 20
LABELS = ("a", "b")


async def read_event(process: asyncio.subprocess.Process) -> Dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), STEP_TIMEOUT)
    if not line:
        raise AssertionError(f"worker exited with {await process.wait()} before its event")
    return json.loads(line)


async def tell(process: asyncio.subprocess.Process) -> None:
    assert process.stdin is not None
    process.stdin.write(b"next\n")
    await process.stdin.drain()


def test_two_processes_share_the_identity_with_different_peers(
    daemon: Daemon, relay: Relay, tmp_path: Path
) -> None:
    async def start_worker(label: str, remote: PeerManager) -> asyncio.subprocess.Process:
        with open(tmp_path / f"worker-{label}.log", "wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                daemon.socket,
                str(remote.uuid),
                label,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )

    async def exchange(
        remotes: Dict[str, PeerManager], workers: Dict[str, asyncio.subprocess.Process]
    ) -> None:
        for label in LABELS:  # one after the other: a subscribes before b
            workers[label] = await start_worker(label, remotes[label])
            ready = await read_event(workers[label])
            assert ready["event"] == "ready" and uuid.UUID(ready["uuid"]) == daemon.uuid

        for label in reversed(LABELS):  # b opens its peer connection first
            remote, worker = remotes[label], workers[label]
            await tell(worker)
            source, data = await asyncio.wait_for(remote.recv(), STEP_TIMEOUT)
            assert (source, data) == (daemon.uuid, f"from {label}".encode())
            await asyncio.wait_for(remote.send(daemon.uuid, f"to {label}".encode()), STEP_TIMEOUT)
            assert await read_event(worker) == {
                "event": "received",
                "source": str(remote.uuid),
                "data": f"to {label}",
            }

        # Both peer connections were open at once; now let the workers go.
        for worker in workers.values():
            await tell(worker)
        for worker in workers.values():
            assert await asyncio.wait_for(worker.wait(), STEP_TIMEOUT) == 0

    async def main() -> None:
        remotes = {
            label: PeerManager(RelayClient(relay.url, client_name=label), ice_servers=[])
            for label in LABELS
        }
        for remote in remotes.values():
            await remote.async_init()
        workers: Dict[str, asyncio.subprocess.Process] = {}
        try:
            await exchange(remotes, workers)
        except (AssertionError, asyncio.TimeoutError) as e:
            logs = "\n".join(
                f"--- worker {label}:\n{log_tail(tmp_path / f'worker-{label}.log')}"
                for label in workers
            )
            raise AssertionError(f"{e!r}\n{logs}") from e
        finally:
            for worker in workers.values():
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
            for remote in remotes.values():
                await remote.close()

    asyncio.run(main())
