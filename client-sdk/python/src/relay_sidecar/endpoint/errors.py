"""Why an endpoint command failed, in words its user can act on."""

from __future__ import annotations

__all__ = ["EndpointAlreadyRunningError", "EndpointError", "IdentityMismatchError"]


class EndpointError(Exception):
    """A command failed; the message says why and what to do."""


class EndpointAlreadyRunningError(EndpointError):
    """Another subscriber holds (or shares) the daemon's ProxyStore group."""


class IdentityMismatchError(EndpointError):
    """The daemon's uuid is not the endpoint's."""
