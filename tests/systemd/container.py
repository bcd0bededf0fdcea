"""A Debian 12 system booted with systemd as PID 1 in a container, for the
tests of the units under a real systemd.

The root file system is made once by debootstrap and cached (keyed by what
went into it); each run boots an overlay on top of it, so every run starts
clean and a reboot keeps what the run changed. The container has a network of
its own (loopback only): everything the tests talk to runs inside it.
Commands go in with nsenter, as root or, through runuser, as another user.

Needs root, systemd-nspawn (systemd-container) and debootstrap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# What the cached root file system is made of; any change makes a new one.
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("systemd", "systemd-sysv", "dbus")
MIRROR = os.environ.get("RELAY_SIDECAR_DEBIAN_MIRROR", "http://deb.debian.org/debian")

HOSTNAME = "sidecar-host"
# Where the directory holding the package under test appears inside.
PACKAGES = "/mnt/packages"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Failure guards, not delays: a cold debootstrap takes about a minute here, a
# boot about a second.
DEBOOTSTRAP_TIMEOUT = 900
BOOT_TIMEOUT = 60
COMMAND_TIMEOUT = 120


class ContainerError(AssertionError):
    """The container could not be made, booted or driven."""


def cache_dir() -> Path:
    """Where root file systems are kept between runs."""
    explicit = os.environ.get("RELAY_SIDECAR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "relay-sidecar"


def rootfs() -> Path:
    """The cached root file system, made by debootstrap if there is none yet
    (by one process at a time: others wait on the lock)."""
    recipe = f"{SUITE} {VARIANT} {','.join(INCLUDE)} {MIRROR}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / f"rootfs-{SUITE}-{key}"
    with open(cache / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done / "etc" / "os-release").exists():
            return done
        partial = cache / f"rootfs-{SUITE}-{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        log = cache / f"rootfs-{SUITE}-{key}.log"
        argv = [
            "debootstrap",
            f"--variant={VARIANT}",
            f"--include={','.join(INCLUDE)}",
            SUITE,
            str(partial),
            MIRROR,
        ]
        with open(log, "wb") as out:
            try:
                result = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT
                )
            except subprocess.TimeoutExpired:
                raise ContainerError(
                    f"{' '.join(argv)} took over {DEBOOTSTRAP_TIMEOUT} s"
                ) from None
        if result.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} failed ({result.returncode}); the end of {log}:\n{tail(log, 30)}"
            )
        partial.rename(done)
        return done


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class Container:
    """One booted container over an overlay of the cached root file system.

    `packages` is a host directory shown read-only at PACKAGES inside.
    """

    def __init__(self, lower: Path, packages: Path):
        self.work = Path(tempfile.mkdtemp(prefix="relay-sidecar-container-", dir="/var/tmp"))
        self.root = self.work / "root"
        self.packages = packages
        for name in ("upper", "overlay-work", "root"):
            (self.work / name).mkdir()
        options = (
            f"lowerdir={lower},upperdir={self.work / 'upper'},workdir={self.work / 'overlay-work'}"
        )
        mount = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
            capture_output=True,
            text=True,
        )
        if mount.returncode != 0:
            shutil.rmtree(self.work, ignore_errors=True)
            raise ContainerError(f"cannot mount the overlay: {mount.stderr.strip()}")
        # The host's /etc/hostname came along with debootstrap.
        (self.root / "etc" / "hostname").write_text(f"{HOSTNAME}\n")
        self.nspawn: subprocess.Popen | None = None
        self.pid1 = 0
        self.boots = 0
        # Whose status and journal a failure shows.
        self.units = ["relay-sidecar.service", "relay-sidecar.socket"]

    # Booting and stopping.

    def boot(self) -> None:
        """Boots the container and waits until systemd has finished starting up."""
        self.boots += 1
        self.console = self.work / f"console-{self.boots}.log"
        with open(self.console, "wb") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    f"--directory={self.root}",
                    f"--hostname={HOSTNAME}",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    f"--bind-ro={self.packages}:{PACKAGES}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.pid1 = 0
        while not self.pid1:
            self._check_alive("while booting")
            self.pid1 = self._init_pid()
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"no init in the container after {BOOT_TIMEOUT} s\n{self.console_tail()}"
                )
            time.sleep(0.05)
        # is-system-running --wait needs the container's bus: retry until it answers.
        while True:
            self._check_alive("while booting")
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT
            )
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"the container did not finish booting in {BOOT_TIMEOUT} s "
                    f"(is-system-running: {state.stdout.strip()} {state.stderr.strip()})\n"
                    f"{self.console_tail()}"
                )
            time.sleep(0.2)

    def _init_pid(self) -> int:
        """The container's PID 1 as the host sees it: nspawn's child running systemd."""
        assert self.nspawn is not None
        try:
            children = (
                Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
            )
        except OSError:
            return 0
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return 0

    def _check_alive(self, doing: str) -> None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited ({self.nspawn.returncode}) {doing}\n{self.console_tail()}"
            )

    def console_tail(self, lines: int = 40) -> str:
        return f"the container's console (end):\n{tail(self.console, lines)}"

    def reboot(self) -> None:
        """`systemctl reboot` inside: nspawn exits with 133 (reboot asked
        for), and the same overlay is booted again."""
        assert self.nspawn is not None
        self.run("systemctl", "reboot", check=False)
        try:
            code = self.nspawn.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ContainerError(
                f"the container did not go down for reboot\n{self.console_tail()}"
            ) from None
        if code != 133:
            raise ContainerError(
                f"systemd-nspawn exited {code} on reboot, not 133\n{self.console_tail()}"
            )
        self.boot()

    def close(self) -> None:
        """Powers the container off (or kills it) and removes the overlay."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=10)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        subprocess.run(["umount", str(self.root)], capture_output=True)
        if os.environ.get("RELAY_SIDECAR_KEEP_CONTAINER"):
            print(f"container kept in {self.work}")
            return
        shutil.rmtree(self.work, ignore_errors=True)

    # Commands inside.

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs argv in the container (all its namespaces) with a clean
        environment, as root or as `user`."""
        inner = list(argv)
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        full = [
            "nsenter",
            "-t",
            str(self.pid1),
            "-a",
            "env",
            "-i",
            f"PATH={PATH}",
            "LANG=C.UTF-8",
            *inner,
        ]
        try:
            result = subprocess.run(
                full, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(
                f"{' '.join(inner)} took over {timeout} s\n{self.diagnosis()}"
            ) from None
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(inner)} exited {result.returncode}\n"
                f"stdout: {result.stdout.strip()}\n"
                f"stderr: {result.stderr.strip()}\n{self.diagnosis()}"
            )
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kwargs)

    def spawn(self, *argv: str, user: str | None = None) -> subprocess.Popen:
        """Starts argv in the container and returns at once."""
        inner = list(argv)
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", *inner],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILLs a process from `spawn` and everything it started inside
        (killing nsenter alone would leave them running in the container,
        and its shutdown waiting for them)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        tree, todo = [], [process.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def write(self, path: str, text: str) -> None:
        """Writes a file inside, as root."""
        self.run("mkdir", "-p", os.path.dirname(path))
        self.run("tee", path, input=text)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of some properties."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> list[dict]:
        """The unit's journal entries, as journalctl's JSON objects."""
        out = self.run("journalctl", "--unit", unit, "--output=json", "--no-pager", "--all").stdout
        entries = []
        for line in out.splitlines():
            entry = json.loads(line)
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # not UTF-8: journald gives bytes
                entry["MESSAGE"] = bytes(message).decode(errors="replace")
            entries.append(entry)
        return entries

    def diagnosis(self) -> str:
        """What a failure message should show: the units' status and the end
        of their journal."""
        if self.nspawn is None or self.nspawn.poll() is not None or not self.pid1:
            return self.console_tail()
        parts = []
        journal = ["journalctl", "--no-pager", "--lines=40"]
        for unit in self.units:
            journal += ["--unit", unit]
        for argv in (["systemctl", "status", "--no-pager", "--lines=0", *self.units], journal):
            full = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", *argv]
            with contextlib.suppress(subprocess.TimeoutExpired):
                out = subprocess.run(full, capture_output=True, text=True, timeout=20)
                parts.append(f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def wait_for(self, what: str, condition, timeout: float = 30.0):
        """Polls `condition` (a state inside the container, where no event
        can be awaited from outside) until it returns a true value, which is
        returned; fails with the unit's status and journal after `timeout`."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = condition()
            if last:
                return last
            time.sleep(0.1)
        raise ContainerError(f"{what}: not within {timeout} s (last: {last!r})\n{self.diagnosis()}")
