"""The ``relay-sidecar-endpoint`` command line.

Parsing and ``--help`` need neither ProxyStore nor a daemon: ProxyStore is
imported only once a command runs, after its version has been checked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .. import RelaySidecarError, __version__
from .._socket import SOCKET_ENV
from . import compat
from .errors import EndpointError

__all__ = ["START_TIMEOUT", "main"]

logger = logging.getLogger("relay_sidecar.endpoint")

#: How long ``start`` waits, by default, for the daemon to answer (one just
#: started by a job script) and for a detached endpoint to serve. Imports,
#: registration through the daemon and binding the port take a few seconds
#: on a loaded login node; a minute leaves room without letting a stuck
#: start hang a job script.
START_TIMEOUT = 60.0

LOG_LEVELS = ("ERROR", "WARNING", "INFO", "DEBUG")


class _Formatter(logging.Formatter):
    """``LEVEL: message`` as ProxyStore's CLI prints it; records marked
    ``simple`` (ProxyStore's ``list`` table) bare."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "simple", False):
            return record.getMessage()
        return f"{record.levelname}: {record.getMessage()}"


def _setup_logging(level: str) -> None:
    """Results to stdout, warnings and errors to stderr."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_Formatter())
    logging.basicConfig(level=level, handlers=[out, err], force=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay-sidecar-endpoint",
        description=(
            "Manage and start ProxyStore endpoints that peer through this host's "
            "relay-sidecar daemon: ordinary ProxyStore endpoints (same configs, same "
            "EndpointConnector) whose relay connection is the daemon's. Supports "
            f"{compat.SUPPORTED}."
        ),
        epilog=(
            f"The daemon's socket: --socket, else ${SOCKET_ENV}, else the daemon's "
            "default path. Endpoints live in ProxyStore's home directory "
            "($PROXYSTORE_HOME, else ~/.local/share/proxystore)."
        ),
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="minimum logging level (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    socket_help = f"the daemon's socket (default: ${SOCKET_ENV}, else the daemon's default)"

    configure = commands.add_parser(
        "configure",
        help="configure a new endpoint for the daemon",
        description=(
            "Write a ProxyStore endpoint config whose uuid and relay address are the "
            "daemon's; the relay's authentication is left to the daemon. Needs the "
            "daemon running."
        ),
    )
    configure.add_argument("name", metavar="NAME", help="the endpoint's name")
    configure.add_argument(
        "--host",
        default="ip",
        help='the address the endpoint publishes: "ip", "fqdn", or a static '
        "address (default: %(default)s)",
    )
    configure.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="the HTTP port to listen on (default: a free one from 10240-20480)",
    )
    configure.add_argument(
        "--peer-channels",
        type=int,
        default=1,
        metavar="COUNT",
        help="data channels per peer connection (default: %(default)s)",
    )
    configure.add_argument(
        "--persist",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep the endpoint's data in a database across restarts (default: no)",
    )
    configure.add_argument("--socket", metavar="PATH", help=socket_help)

    start = commands.add_parser(
        "start",
        help="start an endpoint on the daemon",
        description=(
            "Start a configured endpoint, peering through the daemon. Refused when "
            "the daemon's uuid is not the endpoint's, or when another endpoint "
            "already uses the daemon."
        ),
    )
    start.add_argument("name", metavar="NAME", help="the endpoint's name")
    start.add_argument(
        "--detach",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run in the background, returning once the endpoint serves (default: yes)",
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the daemon to answer and, detached, for the "
        "endpoint to serve (else it is stopped) (default: %(default)g)",
    )
    start.add_argument("--socket", metavar="PATH", help=socket_help)

    stop = commands.add_parser("stop", help="stop a running endpoint")
    stop.add_argument("name", metavar="NAME", help="the endpoint's name")
    commands.add_parser("list", help="list this user's endpoints")
    remove = commands.add_parser("remove", help="remove a stopped endpoint")
    remove.add_argument("name", metavar="NAME", help="the endpoint's name")
    commands.add_parser("version", help="show the versions in use")
    commands.add_parser("help", help="show this help")
    return parser


def _run(args: argparse.Namespace) -> int:
    """Runs one command (ProxyStore's version already checked)."""
    from . import commands

    try:
        if args.command == "configure":
            commands.configure(
                args.name,
                socket_path=args.socket,
                host=args.host,
                port=args.port,
                peer_channels=args.peer_channels,
                persist=args.persist,
            )
            return 0
        if args.command == "start":
            commands.start(
                args.name,
                socket_path=args.socket,
                detach=args.detach,
                timeout=args.timeout,
                log_level=args.log_level,
            )
            return 0
        if args.command == "stop":
            return commands.stop(args.name)
        if args.command == "list":
            return commands.list_endpoints()
        if args.command == "remove":
            return commands.remove(args.name)
    except (EndpointError, RelaySidecarError) as e:
        logger.error(str(e))
        return 1
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: Optional[List[str]] = None) -> int:
    """The ``relay-sidecar-endpoint`` entry point; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command in (None, "help"):
        parser.print_help()
        return 0 if args.command == "help" else 2
    if args.command == "version":
        try:
            proxystore = compat.installed_version()
        except compat.UnsupportedProxyStoreError:
            proxystore = "not installed"
        print(f"relay-sidecar-endpoint {__version__}; ProxyStore {proxystore}")
        print(f"supports {compat.SUPPORTED}")
        return 0
    try:
        compat.check_proxystore()
        return _run(args)
    except compat.UnsupportedProxyStoreError as e:
        logger.error(str(e))
        return 1
    except ImportError as e:
        # ProxyStore without its [endpoints] extra says what to install.
        logger.error(str(e))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
