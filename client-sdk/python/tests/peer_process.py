"""One process of ProxyStore PeerManagers for the conversation tests: either
on this host's daemon (``SidecarRelayClient``) or a plain ProxyStore peer on
another "host" (ProxyStore's own ``RelayClient``), driven over stdin/stdout.

Usage:
    peer_process.py sidecar SOCKET [--managers N] [--no-group] [--plain-manager]
    peer_process.py native RELAY_URL [--managers N] [--uuid UUID]
    (both: [--timeout SECONDS])

stdin, one JSON object per line; every command may name a manager (``"m"``,
default 0) and carries an ``"id"`` that its event repeats:
    {"cmd": "send", "peer": UUID, "size": N}   random bytes to a peer
    {"cmd": "recv", "within": SECONDS}         the next message
    {"cmd": "echo", "within": SECONDS}         the next message, sent back
                                               (new random bytes, same size)
    {"cmd": "close_connection", "peer": UUID}
    {"cmd": "close_client"}                    close() the relay client under
                                               the running manager
    {"cmd": "quit"}                            close everything, exit 0

stdout, one JSON object per line:
    {"event": "ready", "uuids": [...], "workers": [...]}
    {"event": "sent", "id": .., "digest": SHA256}
    {"event": "failed", "id": .., "error": CLASS, "bases": [...], "message": ..}
    {"event": "received", "id": .., "source": UUID, "size": N, "digest": SHA256}
    {"event": "done", "id": ..}                close_connection
    {"event": "client_closed", "id": .., "loop_ended": BOOL, "loop_error": ..}

Commands run concurrently. A background task of a PeerManager that fails
ends the process with SystemExit(1) (ProxyStore's exit_on_error): the tests see
the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import uuid
from typing import Any, Dict, List

from proxystore.p2p.manager import PeerManager as ProxyStorePeerManager
from proxystore.p2p.relay.client import RelayClient

from relay_sidecar.proxystore import PeerManager, SidecarRelayClient


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def failure(e: BaseException) -> Dict[str, Any]:
    return {
        "error": type(e).__name__,
        "bases": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__],
        "message": str(e),
    }


async def make_managers(args: argparse.Namespace) -> List[ProxyStorePeerManager]:
    managers = []
    for i in range(args.managers):
        if args.side == "sidecar":
            client: Any = SidecarRelayClient(
                socket_path=args.target,
                group=None if args.no_group else "proxystore",
                timeout=args.timeout,
            )
            kind = ProxyStorePeerManager if args.plain_manager else PeerManager
        else:
            given = uuid.UUID(args.uuid) if args.uuid and i == 0 else None
            client = RelayClient(args.target, client_uuid=given, client_name=f"remote-{i}")
            kind = ProxyStorePeerManager
        managers.append(kind(client, ice_servers=[], timeout=args.timeout))
    for manager in managers:
        await manager.async_init()
    return managers


async def run(command: Dict[str, Any], managers: List[ProxyStorePeerManager]) -> None:
    ident = command.get("id")
    manager = managers[command.get("m", 0)]
    cmd = command["cmd"]
    try:
        if cmd == "send":
            data = os.urandom(command["size"])
            await manager.send(uuid.UUID(command["peer"]), data, timeout=command.get("timeout", 30))
            emit("sent", id=ident, digest=hashlib.sha256(data).hexdigest())
        elif cmd in ("recv", "echo"):
            source, data = await asyncio.wait_for(manager.recv(), command.get("within", 30))
            emit(
                "received",
                id=ident,
                source=str(source),
                size=len(data),
                digest=hashlib.sha256(data).hexdigest(),
            )
            if cmd == "echo":
                reply = os.urandom(len(data))
                await manager.send(source, reply)
                emit("sent", id=ident, digest=hashlib.sha256(reply).hexdigest())
        elif cmd == "close_connection":
            await manager.close_connection((manager.uuid, uuid.UUID(command["peer"])))
            emit("done", id=ident)
        elif cmd == "close_client":
            await manager.relay_client.close()
            task = manager._server_task
            assert task is not None
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
                error = None
            except asyncio.TimeoutError:
                error = "still running"
            except BaseException as e:  # noqa: BLE001 - reported to the test
                error = repr(e)
            emit("client_closed", id=ident, loop_ended=task.done(), loop_error=error)
        else:
            raise ValueError(f"unknown command {cmd!r}")
    except Exception as e:  # noqa: BLE001 - reported to the test
        emit("failed", id=ident, **failure(e))


async def main(args: argparse.Namespace) -> None:
    managers = await make_managers(args)
    emit(
        "ready",
        uuids=[str(m.uuid) for m in managers],
        workers=[getattr(m.relay_client, "worker", None) for m in managers],
    )
    loop = asyncio.get_running_loop()
    tasks = set()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        task = asyncio.ensure_future(run(command, managers))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    for manager in managers:
        await manager.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["sidecar", "native"])
    parser.add_argument("target", help="the daemon's socket, or the relay's URL")
    parser.add_argument("--managers", type=int, default=1)
    parser.add_argument("--no-group", action="store_true")
    parser.add_argument("--plain-manager", action="store_true")
    parser.add_argument("--uuid")
    parser.add_argument("--timeout", type=float, default=20)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(main(parser.parse_args()))
