"""A plain grpcio client for relay-sidecar, with stubs generated from proto/
at run time: proof that any gRPC language can use the daemon from the
contract alone.

Usage: grpc_client.py --proto-dir DIR --socket PATH --peer UUID

Prints one JSON object per line:
  {"event": "status", ...GetStatusResponse fields...}
  {"event": "sent", "peer_uuid": ...}
  {"event": "message", ...PeerMessage fields...}       (one per message)
  {"event": "invalid_argument", "details": "..."}      (a bad peer_uuid)
and exits 0 once it has seen both a message from a peer and the bounce of
its send to an unknown peer.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import threading
import uuid


def generate_stubs(proto_dir: str, out_dir: str) -> None:
    from grpc_tools import protoc

    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    source = os.path.join(proto_dir, "relay_sidecar", "v1", "relay_sidecar.proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            source,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with {code} on {source}")


_emit_lock = threading.Lock()


def emit(event: str, **fields) -> None:
    # Two threads print; one write per line keeps the lines whole.
    line = json.dumps({"event": event, **fields}) + "\n"
    with _emit_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--peer", required=True)
    args = parser.parse_args()

    import grpc
    from google.protobuf import json_format

    out_dir = tempfile.mkdtemp(prefix="relay-sidecar-stubs-")
    generate_stubs(args.proto_dir, out_dir)
    # Regular packages, first on the path: an installed relay_sidecar (the
    # Python SDK) must not shadow these stubs.
    for package in ("relay_sidecar", os.path.join("relay_sidecar", "v1")):
        open(os.path.join(out_dir, package, "__init__.py"), "w").close()
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("relay_sidecar.v1.relay_sidecar_pb2")
    pb_grpc = importlib.import_module("relay_sidecar.v1.relay_sidecar_pb2_grpc")

    # grpcio puts the socket path in :authority, which HTTP/2 servers may
    # refuse; a plain host name avoids that.
    channel = grpc.insecure_channel(
        f"unix:{args.socket}", options=[("grpc.default_authority", "localhost")]
    )
    stub = pb_grpc.RelaySidecarStub(channel)

    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    emit(
        "status",
        **json_format.MessageToDict(
            status, preserving_proto_field_name=True, use_integers_for_enums=False
        ),
    )

    subscription = stub.Subscribe(pb.SubscribeRequest())
    bounced = threading.Event()
    from_peer = threading.Event()

    def read() -> None:
        for response in subscription:
            message = response.message
            emit(
                "message",
                source_uuid=message.source_uuid,
                source_name=message.source_name,
                peer_uuid=message.peer_uuid,
                description_type=message.description_type,
                description=message.description,
                error=message.error if message.HasField("error") else None,
                bounced=message.bounced,
            )
            (bounced if message.bounced else from_peer).set()
            if bounced.is_set() and from_peer.is_set():
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    stub.Send(
        pb.SendRequest(
            peer_uuid=args.peer,
            description_type="offer",
            description="hello from grpcio",
        ),
        timeout=10,
    )
    emit("sent", peer_uuid=args.peer)

    try:
        stub.Send(
            pb.SendRequest(peer_uuid="nope", description_type="offer", description="x"),
            timeout=10,
        )
        emit("unexpected_ok")
        return 1
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        emit("invalid_argument", details=e.details())

    nobody = str(uuid.uuid4())
    stub.Send(
        pb.SendRequest(peer_uuid=nobody, description_type="answer", description="lost"),
        timeout=10,
    )
    emit("sent", peer_uuid=nobody)
    for event, name in ((bounced, "bounce"), (from_peer, "peer message")):
        if not event.wait(timeout=20):
            emit("timeout", waiting_for=name)
            return 1
    subscription.cancel()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
