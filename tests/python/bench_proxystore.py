"""The ProxyStore anchor of the benchmark: a pair of REAL ProxyStore clients.

`relay-sidecar-bench` (bench/src/python.rs) runs this with
the interpreter of the project's `.venv` (proxystore 1.1.0), against a real
`proxystore-relay` that the bench started, and reads one JSON object from
stdout. It is what a user without the sidecar would run: two
`RelayClient`s, A and B, in one asyncio process.

    python bench_proxystore.py --url ws://127.0.0.1:PORT \
        [--latency N] [--throughput N] [--repetitions R] [--payload BYTES]

Per repetition:
- latency: N ping-pongs, sequential. A sends a peer connection message to B,
  B answers A with one, A receives it; one-way = round trip / 2 (both
  clients share this process's clock, but the round trip is what the Rust
  side measures too, so the figures compare like for like).
- throughput: A sends N messages to B as fast as `RelayClient.send` lets it
  while B receives them; messages/s from the first send to the last receive.

stdout: {"proxystore": "<version>", "python": "<version>",
         "latency_us": [[one-way µs, ...] per repetition],
         "throughput": [messages/s per repetition]}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
import uuid

import proxystore
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.messages import PeerConnectionRequest

WARMUP = 50


def message(source: RelayClient, target: RelayClient, description: str,
            kind: str = 'offer') -> PeerConnectionRequest:
    return PeerConnectionRequest(
        source_uuid=source.uuid,
        source_name=source.name,
        peer_uuid=target.uuid,
        description_type=kind,  # type: ignore[arg-type]
        description=description,
    )


def payload(seq: int, size: int) -> str:
    head = f'{seq}:'
    return head + 'x' * max(0, size - len(head))


async def latency(a: RelayClient, b: RelayClient, count: int,
                  size: int) -> list[float]:
    async def pong() -> None:
        while True:
            got = await b.recv()
            await b.send(message(b, a, got.description, 'answer'))

    responder = asyncio.create_task(pong())
    samples: list[float] = []
    try:
        for seq in range(WARMUP + count):
            text = payload(seq, size)
            start = time.perf_counter_ns()
            await a.send(message(a, b, text))
            got = await a.recv()
            elapsed = time.perf_counter_ns() - start
            if got.description != text:
                raise RuntimeError(f'ping {seq}: got {got.description[:20]!r}')
            if seq >= WARMUP:
                samples.append(elapsed / 2 / 1000)
    finally:
        responder.cancel()
        await asyncio.gather(responder, return_exceptions=True)
    return samples


async def throughput(a: RelayClient, b: RelayClient, count: int,
                     size: int) -> float:
    async def receive() -> None:
        for _ in range(count):
            await b.recv()

    messages = [message(a, b, payload(seq, size)) for seq in range(count)]
    receiver = asyncio.create_task(receive())
    start = time.perf_counter()
    for m in messages:
        await a.send(m)
    await receiver
    return count / (time.perf_counter() - start)


async def amain(args: argparse.Namespace) -> dict[str, object]:
    a = RelayClient(args.url, client_name='bench-a', client_uuid=uuid.uuid4())
    b = RelayClient(args.url, client_name='bench-b', client_uuid=uuid.uuid4())
    await a.connect()
    await b.connect()
    result: dict[str, object] = {
        'proxystore': proxystore.__version__,
        'python': platform.python_version(),
        'latency_us': [],
        'throughput': [],
    }
    try:
        for _ in range(args.repetitions):
            result['latency_us'].append(  # type: ignore[attr-defined]
                await latency(a, b, args.latency, args.payload))
            result['throughput'].append(  # type: ignore[attr-defined]
                await throughput(a, b, args.throughput, args.payload))
    finally:
        await a.close()
        await b.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True, help='ws:// URL of the relay')
    parser.add_argument('--latency', type=int, default=2000,
                        help='ping-pongs per repetition')
    parser.add_argument('--throughput', type=int, default=20000,
                        help='pipelined messages per repetition')
    parser.add_argument('--repetitions', type=int, default=3)
    parser.add_argument('--payload', type=int, default=128,
                        help='description size in bytes')
    args = parser.parse_args()
    result = asyncio.run(amain(args))
    sys.stdout.write(json.dumps(result) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
