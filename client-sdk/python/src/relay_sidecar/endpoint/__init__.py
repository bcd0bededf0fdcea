"""``relay-sidecar-endpoint``: ProxyStore endpoints that peer through the daemon.

A ProxyStore endpoint normally holds its own relay connection. One started
with ``relay-sidecar-endpoint start NAME`` is ProxyStore's own endpoint (its
config format, HTTP API, storage and peering, from the installed ProxyStore),
but its relay client is the host's relay-sidecar daemon: it is the daemon's
peer identity, keeps its registration through relay outages and endpoint
restarts, and shows in ``relayctl``. Workers reach it through ProxyStore's
``EndpointConnector`` as they reach any endpoint.

Modules: ``cli`` (the command line), ``commands`` (what each command does),
``serve`` (the endpoint process), ``exclusive`` (one endpoint per daemon),
``compat`` (the supported ProxyStore releases), ``errors``.
"""
