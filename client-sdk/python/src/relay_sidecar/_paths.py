"""Where clients look for the relay-sidecar daemon's socket.

The same rule as the Rust SDK's ``relay_sidecar_client::paths`` (which the
daemon and ``relayctl`` use too); a test in the repository runs both over
one table of environments. Standard library only, so that the test can load
this file on its own.

Given no socket, a client tries in order:

- ``$RELAY_SIDECAR_SOCKET`` alone, when set;
- else, with a job label (``$RELAY_SIDECAR_JOB``), the job's socket
  ``job-LABEL/relay.sock`` under each of the user's runtime directories;
- else ``relay.sock`` under each of the user's runtime directories
  (``$XDG_RUNTIME_DIR/relay-sidecar`` when set, then
  ``/tmp/relay-sidecar-$UID``), then the system service's
  ``/run/relay-sidecar/relay.sock``.

Root tries only the system service's. Empty variables count as unset, and
an ``$XDG_RUNTIME_DIR`` that is not an absolute path is ignored.
"""

from __future__ import annotations

import os
import re
from typing import List, Mapping, Optional

SOCKET_ENV = "RELAY_SIDECAR_SOCKET"
JOB_ENV = "RELAY_SIDECAR_JOB"
SYSTEM_RUNTIME_DIR = "/run/relay-sidecar"
SOCKET_NAME = "relay.sock"
MAX_JOB_LEN = 48
_APP_DIR = "relay-sidecar"
_JOB = re.compile(r"[A-Za-z0-9._-]+")


def job_dir_name(job: str) -> str:
    """``job-LABEL`` for a job label; ``ValueError`` for one that cannot name
    a directory."""
    if len(job) > MAX_JOB_LEN or job.startswith(".") or not _JOB.fullmatch(job):
        raise ValueError(
            f"job {job!r}: a job label is 1 to {MAX_JOB_LEN} letters, digits, '.', '_' "
            "or '-', not starting with '.' (e.g. a Slurm job id, "
            "RELAY_SIDECAR_JOB=$SLURM_JOB_ID)"
        )
    return f"job-{job}"


def user_runtime_bases(environ: Mapping[str, str], uid: int) -> List[str]:
    """A user daemon's possible runtime directories, best first."""
    bases = []
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        bases.append(os.path.join(xdg, _APP_DIR))
    bases.append(f"/tmp/{_APP_DIR}-{uid}")
    return bases


def socket_candidates(
    environ: Optional[Mapping[str, str]] = None, uid: Optional[int] = None
) -> List[str]:
    """The sockets a client tries, in order (see the module's docstring)."""
    env = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    socket = env.get(SOCKET_ENV, "")
    if socket:
        return [socket]
    job = env.get(JOB_ENV, "")
    job_dir = job_dir_name(job) if job else None
    system = os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    if uid == 0:
        if job_dir is not None:
            return [os.path.join(SYSTEM_RUNTIME_DIR, job_dir, SOCKET_NAME)]
        return [system]
    bases = user_runtime_bases(env, uid)
    if job_dir is not None:
        return [os.path.join(base, job_dir, SOCKET_NAME) for base in bases]
    return [os.path.join(base, SOCKET_NAME) for base in bases] + [system]
