"""Resolves pickled ProxyStore proxies on "another host", for test_endpoint.py.

Usage: resolve_proxies.py FILE

FILE holds a pickled list of proxies to bytes. Each is resolved here, where
$PROXYSTORE_HOME is the other host's, so the proxy's EndpointConnector finds
that host's endpoint, which fetches the bytes from their owner over a peer
connection. Prints one JSON line: [[length, sha256 hex], ...] in order.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys

from proxystore.proxy import extract


def main(path: str) -> None:
    with open(path, "rb") as f:
        proxies = pickle.load(f)
    resolved = [extract(proxy) for proxy in proxies]
    print(json.dumps([[len(value), hashlib.sha256(value).hexdigest()] for value in resolved]))


if __name__ == "__main__":
    main(sys.argv[1])
