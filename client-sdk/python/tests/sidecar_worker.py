"""One worker process for test_processes.py: a ProxyStore PeerManager on
SidecarRelayClient that opens a peer connection to one remote peer.

Usage: sidecar_worker.py SOCKET PEER_UUID LABEL

Prints JSON lines: {"event": "ready", "uuid": ..., "worker": ...} once it is
subscribed; then waits for a line on stdin, sends b"from LABEL" to the peer
over the peer connection, and prints {"event": "received", "source": ...,
"data": ...} for the first message that comes back. It keeps the peer
connection open until the next line on stdin (or its end).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from relay_sidecar.proxystore import PeerManager, SidecarRelayClient

STEP_TIMEOUT = 20


def emit(event: str, **fields: str) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main(socket: str, peer: uuid.UUID, label: str) -> None:
    client = SidecarRelayClient(socket_path=socket)
    async with PeerManager(client, ice_servers=[], timeout=STEP_TIMEOUT) as manager:
        emit("ready", uuid=str(manager.uuid), worker=client.worker)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.wait_for(manager.send(peer, f"from {label}".encode()), STEP_TIMEOUT)
        source, data = await asyncio.wait_for(manager.recv(), STEP_TIMEOUT)
        assert isinstance(data, bytes)
        emit("received", source=str(source), data=data.decode())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], uuid.UUID(sys.argv[2]), sys.argv[3]))
