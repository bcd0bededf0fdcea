"""Fixtures for the units under a real systemd: one booted container for the
whole module, with the package installed the way the README says and a relay
running inside."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from container import Container, rootfs

HOW_TO_BUILD = "cargo deb -p relay-sidecar (scripts/test does it, and exports RELAY_SIDECAR_DEB)"


def package() -> Path:
    """The .deb under test, from RELAY_SIDECAR_DEB; fails (never skips) when
    it is missing."""
    path = os.environ.get("RELAY_SIDECAR_DEB")
    if not path:
        pytest.fail(f"RELAY_SIDECAR_DEB is not set: build the package with {HOW_TO_BUILD}")
    if not Path(path).is_file():
        pytest.fail(f"RELAY_SIDECAR_DEB={path} is not a file: build it with {HOW_TO_BUILD}")
    return Path(path)


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the container tests boot systemd-nspawn and must run as root")
    for tool, package_name in (
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed: apt-get install {package_name} (scripts/test does)"
            )


@pytest.fixture(scope="session")
def container():
    require_root_and_tools()
    deb = package()
    # Only the package under test, readable by apt's sandbox user.
    packages = Path(tempfile.mkdtemp(prefix="relay-sidecar-packages-"))
    packages.chmod(0o755)
    shutil.copy(deb, packages / deb.name)
    (packages / deb.name).chmod(0o644)
    box = Container(rootfs(), packages)
    try:
        box.boot()
        yield box
    finally:
        box.close()
        shutil.rmtree(packages, ignore_errors=True)
