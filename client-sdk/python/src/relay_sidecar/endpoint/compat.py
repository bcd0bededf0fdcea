"""The ProxyStore releases ``relay-sidecar-endpoint`` runs, checked in one place.

The endpoint is assembled from ProxyStore's public pieces (the endpoint
config files and commands, ``Endpoint``, ``PeerManager``, ``create_app``),
which keep their shape from 0.6.0 through 1.1.x. Before 0.6 the relay client
and its messages were different classes (``SidecarRelayClient`` needs 0.6's);
a release after 1.1 has not been tried, so it is refused rather than trusted.
The few differences inside the range are named here, by the release that
brought them.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Optional, Tuple

__all__ = [
    "OLDEST",
    "NEWEST",
    "SUPPORTED",
    "UnsupportedProxyStoreError",
    "check_proxystore",
    "has_host_type",
    "has_ice_servers",
]

#: The oldest supported release (major, minor).
OLDEST = (0, 6)
#: The newest supported release (major, minor); its patch releases are included.
NEWEST = (1, 1)
#: The supported range, as a user reads it and as pip takes it.
SUPPORTED = "ProxyStore 0.6 to 1.1 (pip: 'proxystore[endpoints]>=0.6,<1.2')"

#: ``EndpointConfig.host_type`` ("ip", "fqdn" or "static") came with 1.0.0;
#: before, an endpoint always published its IP address.
_HOST_TYPE_SINCE = (1, 0)
#: ``EndpointRelayConfig.ice_servers`` and ``PeerManager(ice_servers=...)``
#: came with 1.1.0.
_ICE_SERVERS_SINCE = (1, 1)

Version = Tuple[int, ...]


class UnsupportedProxyStoreError(Exception):
    """ProxyStore is missing, or a release this command does not support."""


def _parse(version: str) -> Version:
    """The leading numbers of a version string: "1.1.0rc1" is (1, 1, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise UnsupportedProxyStoreError(f"cannot read ProxyStore's version {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def installed_version() -> str:
    """The installed ProxyStore's version string."""
    try:
        return importlib.metadata.version("proxystore")
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedProxyStoreError(
            "ProxyStore is not installed; relay-sidecar-endpoint runs a ProxyStore "
            f"endpoint and supports {SUPPORTED}: pip install 'relay-sidecar[proxystore]'"
        ) from None


def check_proxystore(version: Optional[str] = None) -> Version:
    """The ProxyStore version (``version``, else the installed one), parsed,
    once it is known to be supported.

    Raises:
        UnsupportedProxyStoreError: Not installed, or outside 0.6 to 1.1; the
            message says what was found and what to install.
    """
    found = installed_version() if version is None else version
    parsed = _parse(found)
    if not OLDEST <= parsed[:2] <= NEWEST:
        raise UnsupportedProxyStoreError(
            f"relay-sidecar-endpoint supports {SUPPORTED}; ProxyStore {found} is installed"
        )
    return parsed


def has_host_type(version: Version) -> bool:
    """Whether endpoint configs have ``host_type`` (and ``configure --host``)."""
    return version[:2] >= _HOST_TYPE_SINCE


def has_ice_servers(version: Version) -> bool:
    """Whether endpoint configs and ``PeerManager`` take ``ice_servers``."""
    return version[:2] >= _ICE_SERVERS_SINCE
