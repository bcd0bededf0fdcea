"""A remote relay peer for the tests, built on the REAL ProxyStore client.

The Rust integration tests (daemon/tests/support/mod.rs, `PyPeer`) run this
with the interpreter of one of the project's venvs:

    .venv/bin/python        proxystore >= 0.6: proxystore.p2p.relay.client.RelayClient
    .venv-legacy/bin/python proxystore 0.5.2:  proxystore.p2p.relay_client.RelayServerClient

and drive it over stdin/stdout, one JSON object per line.

    python peer.py --url ws://127.0.0.1:8700 [--uuid UUID] [--name NAME]

stdin (commands):
    {"cmd": "send", "peer_uuid": "...", "description_type": "offer",
     "description": "...", ["source_uuid": "...", "error": "..."]}
        send a peer connection message with this peer's uuid/name as source;
        `source_uuid` and `error` forge those fields (the relay checks
        neither), as a hostile peer could
    {"cmd": "quit"}
        close the client and exit 0 (end of stdin does the same)

stdout (events):
    {"event": "registered", "uuid": "...", "name": "..."}
        once registration succeeds; printed again after every automatic
        re-registration (the client reconnects by itself after a close)
    {"event": "message", "source_uuid": ..., "source_name": ...,
     "peer_uuid": ..., "description_type": ..., "description": ...,
     "error": ... or null}
        every peer connection message received (relay bounces have `error`)
    {"event": "relay_response", "success": ..., "message": ..., "error": ...}
        a relay response received outside registration (legacy relay: answer
        to a message from an unregistered socket)
    {"event": "error", "kind": "<exception class>", "detail": "<str(e)>",
     "op": "connect" | "recv" | "send" | "reconnect" | "stdin",
     "code": <close code or null>}
        a failure; the peer keeps going when the client can (recoverable
        closes, decode errors, a bad command) and otherwise exits non-zero
        (a registration error: unrecoverable close such as 4004, or a refused
        registration). `code` is the WebSocket close code the relay sent,
        when there is one.

Exit status: 0 on quit / end of stdin, 2 if the first registration fails,
3 on a fatal error after that.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import threading
import uuid
import warnings
from typing import Any

# proxystore 0.5.2 uses websockets' legacy API (websockets.client.connect),
# which websockets >= 14 still ships but flags as deprecated on every use.
warnings.filterwarnings('ignore', category=DeprecationWarning)

try:
    from proxystore.p2p.relay.client import RelayClient as _BaseClient
    from proxystore.p2p.relay.exceptions import (
        RelayRegistrationError as _RegistrationError,
    )
    from proxystore.p2p.relay.messages import (
        PeerConnectionRequest as _PeerConnection,
    )
    from proxystore.p2p.relay.messages import RelayResponse as _RelayResponse

    DIALECT = 'current'
except ImportError:
    from proxystore.p2p.exceptions import (  # type: ignore[no-redef]
        PeerRegistrationError as _RegistrationError,
    )
    from proxystore.p2p.messages import (  # type: ignore[no-redef]
        PeerConnection as _PeerConnection,
    )
    from proxystore.p2p.messages import (  # type: ignore[no-redef]
        ServerResponse as _RelayResponse,
    )
    from proxystore.p2p.relay_client import (  # type: ignore[no-redef]
        RelayServerClient as _BaseClient,
    )

    DIALECT = 'legacy'

EXIT_FIRST_REGISTRATION = 2
EXIT_FATAL = 3


def emit(event: str, **fields: Any) -> None:
    """Print one event as a JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps({'event': event, **fields}) + '\n')
    sys.stdout.flush()


def close_code(exc: BaseException) -> int | None:
    """The close code the relay sent, if `exc` is a websockets close."""
    rcvd = getattr(exc, 'rcvd', None)
    return getattr(rcvd, 'code', None)


def emit_error(op: str, exc: BaseException) -> None:
    emit(
        'error',
        kind=type(exc).__name__,
        detail=str(exc),
        op=op,
        code=close_code(exc),
    )


class PeerClient(_BaseClient):  # type: ignore[misc,valid-type]
    """The real client, with three small additions for the harness.

    - Every successful registration (first and automatic re-registrations)
      prints a `registered` event.
    - Legacy only: connect() is serialised. 0.5.2 has no lock, so a send and
      a recv both reconnecting after a close would register twice (the
      legacy relay silently replaces the first socket).
    - Current only: the background reconnect task never raises SystemExit
      from a callback (its upstream behaviour on any exception). On an
      unrecoverable close it ends quietly and the recv loop reports the
      failure as events and exits non-zero itself; on any other failure it
      prints an error event (op "reconnect") and keeps reconnecting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._harness_connect_lock = asyncio.Lock()

    async def _register(self, timeout: float) -> Any:
        websocket = await super()._register(timeout)
        emit('registered', uuid=str(self.uuid), name=self.name)
        return websocket

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        if DIALECT == 'legacy':
            async with self._harness_connect_lock:
                return await super().connect(*args, **kwargs)
        return await super().connect(*args, **kwargs)

    async def _reconnect_on_close(self) -> None:
        from proxystore.utils.tasks import SafeTaskExitError

        while True:
            try:
                await super()._reconnect_on_close()
            except _RegistrationError as e:
                raise SafeTaskExitError(str(e)) from e
            except Exception as e:
                # Upstream lets anything else (e.g. websockets' InvalidMessage
                # when the relay dies mid-handshake) kill the process. Report
                # it and go round again: the old socket is still closed, so
                # the upstream loop reconnects at once.
                emit_error('reconnect', e)
                await asyncio.sleep(self._initial_backoff_seconds)


def message_event(message: Any) -> None:
    if isinstance(message, _PeerConnection):
        emit(
            'message',
            source_uuid=str(message.source_uuid),
            source_name=message.source_name,
            peer_uuid=str(message.peer_uuid),
            description_type=message.description_type,
            description=message.description,
            error=message.error,
        )
    elif isinstance(message, _RelayResponse):
        emit(
            'relay_response',
            success=message.success,
            message=message.message,
            error=message.error,
        )
    else:
        fields = dataclasses.asdict(message)
        emit(
            'other',
            type=type(message).__name__,
            data=json.loads(json.dumps(fields, default=str)),
        )


async def recv_loop(client: PeerClient) -> int:
    """Print every message received; returns an exit status on a fatal error."""
    while True:
        try:
            message = await client.recv()
        except asyncio.CancelledError:
            raise
        except _RegistrationError as e:
            emit_error('recv', e)
            return EXIT_FATAL
        except Exception as e:
            # A closed connection (the client reconnects by itself on the
            # next call), an undecodable frame, a binary frame...
            emit_error('recv', e)
            await asyncio.sleep(0.01)
            continue
        message_event(message)


def start_stdin_reader(
    loop: asyncio.AbstractEventLoop,
) -> asyncio.Queue[bytes | None]:
    """Read stdin lines in a thread; None on the queue means end of input.

    The thread uses os.read on fd 0, not sys.stdin: a daemon thread blocked
    inside the buffered reader holds its lock, and interpreter shutdown then
    aborts the process ("could not acquire lock ... at interpreter shutdown").
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(item: bytes | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def read() -> None:
        pending = bytearray()
        while True:
            try:
                chunk = os.read(0, 1 << 16)
            except OSError:
                chunk = b''
            if not chunk:
                if pending:
                    put(bytes(pending))
                put(None)
                return
            start = len(pending)
            pending += chunk
            newline = pending.find(b'\n', start)
            while newline >= 0:
                put(bytes(pending[:newline]))
                del pending[: newline + 1]
                newline = pending.find(b'\n')

    threading.Thread(target=read, name='stdin-reader', daemon=True).start()
    return queue


async def command_loop(
    client: PeerClient,
    queue: asyncio.Queue[bytes | None],
) -> int:
    """Run stdin commands in order; returns the exit status."""
    while True:
        line = await queue.get()
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            cmd = command['cmd']
        except (ValueError, KeyError, TypeError) as e:
            emit_error('stdin', e)
            continue
        if cmd == 'quit':
            return 0
        if cmd != 'send':
            emit('error', kind='UnknownCommand', detail=str(cmd), op='stdin',
                 code=None)
            continue
        try:
            source = command.get('source_uuid')
            message = _PeerConnection(
                source_uuid=uuid.UUID(source) if source else client.uuid,
                source_name=client.name,
                peer_uuid=uuid.UUID(command['peer_uuid']),
                description_type=command.get('description_type', 'offer'),
                description=command.get('description', ''),
                error=command.get('error'),
            )
        except (ValueError, KeyError, TypeError) as e:
            emit_error('stdin', e)
            continue
        try:
            await client.send(message)
        except _RegistrationError as e:
            emit_error('send', e)
            return EXIT_FATAL
        except Exception as e:
            emit_error('send', e)


async def amain(args: argparse.Namespace) -> int:
    client = PeerClient(
        args.url,
        client_uuid=uuid.UUID(args.uuid) if args.uuid else None,
        client_name=args.name,
        timeout=args.timeout,
    )
    try:
        await client.connect()
    except Exception as e:
        emit_error('connect', e)
        return EXIT_FIRST_REGISTRATION

    queue = start_stdin_reader(asyncio.get_running_loop())
    recv_task = asyncio.create_task(recv_loop(client), name='recv')
    command_task = asyncio.create_task(command_loop(client, queue), name='cmd')
    done, _ = await asyncio.wait(
        {recv_task, command_task},
        return_when=asyncio.FIRST_COMPLETED,
    )
    status = done.pop().result()
    for task in (recv_task, command_task):
        task.cancel()
    await asyncio.gather(recv_task, command_task, return_exceptions=True)
    try:
        await client.close()
    except Exception as e:  # closing a dead connection is not a failure
        logging.getLogger(__name__).info('close failed: %r', e)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True, help='ws:// or wss:// URL')
    parser.add_argument('--uuid', default=None, help='client UUID')
    parser.add_argument('--name', default=None, help='client name')
    parser.add_argument('--timeout', type=float, default=10.0,
                        help='handshake / registration timeout (s)')
    args = parser.parse_args()

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f'%(asctime)s peer.py[{DIALECT}] %(name)s %(levelname)s '
               '%(message)s',
    )
    return asyncio.run(amain(args))


if __name__ == '__main__':
    sys.exit(main())
