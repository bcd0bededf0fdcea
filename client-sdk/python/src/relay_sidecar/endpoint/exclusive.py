"""One ProxyStore endpoint per daemon, enforced by the daemon.

Every process that uses a daemon is the same ProxyStore peer: one uuid. A
remote endpoint's request reaches whichever local subscriber the daemon hands
it to, so with two endpoints behind one daemon (or an endpoint and another
local ``PeerManager``) a remote ``get`` lands on the wrong one and a key that
one holds comes back missing from the other. The endpoint's relay client
therefore holds the daemon's ProxyStore delivery group alone: the daemon
refuses every other subscription to the group while the endpoint's stream is
open, and frees the group as soon as that stream ends, however the endpoint
process ends. No lock file is involved, so users who cannot write each
other's files are kept apart all the same.
"""

from __future__ import annotations

from typing import Optional

from .._socket import PathLike, resolve
from ..errors import AlreadyExistsError
from ..proxystore import DEFAULT_GROUP, SidecarRelayClient
from .errors import EndpointAlreadyRunningError

__all__ = ["GROUP", "claim"]

#: The daemon's delivery group the endpoint holds: the one every
#: ``SidecarRelayClient`` joins by default, so that no other local
#: ``PeerManager`` takes a remote endpoint's requests either.
GROUP = DEFAULT_GROUP


async def claim(socket_path: Optional[PathLike]) -> SidecarRelayClient:
    """The endpoint's relay client, connected, holding ``GROUP`` alone.

    Waits (as ``SidecarRelayClient.connect`` does) for the daemon to be
    registered with the relay. Close the client to free the group.

    Raises:
        EndpointAlreadyRunningError: The daemon refused the group: another
            endpoint, or another ``PeerManager`` on the daemon, is subscribed.
        relay_sidecar.ConnectError: No daemon answers on the socket.
    """
    client = SidecarRelayClient(socket_path=socket_path, group=GROUP, exclusive=True)
    try:
        await client.connect()
    except AlreadyExistsError as e:
        raise EndpointAlreadyRunningError(
            f"another ProxyStore endpoint or PeerManager is already using the "
            f"relay-sidecar daemon at {resolve(socket_path)} ({e.message}); "
            "a daemon serves one endpoint: stop the other one first"
        ) from None
    return client
