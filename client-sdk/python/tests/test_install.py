"""The package installs with pip from a clean venv, builds as a wheel and
from its sdist, and refuses to build without the proto or with a stale one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path
from typing import List

from support import REPO_ROOT, Daemon

PACKAGE = REPO_ROOT / "client-sdk" / "python"
PROTO = REPO_ROOT / "proto" / "relay_sidecar" / "v1" / "relay_sidecar.proto"
PIP_TIMEOUT = 600


def run(
    command: List[str], cwd: Path = REPO_ROOT, check: bool = True
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def copy_package(destination: Path) -> Path:
    """The package's sources without build leftovers, at ``destination``."""
    shutil.copytree(
        PACKAGE,
        destination,
        ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "_proto", "__pycache__", "tests"
        ),
    )
    return destination


def build_wheel(source: Path, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    # --no-build-isolation: this venv's setuptools and grpcio-tools, no download.
    return run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=check,
    )


def test_pip_install_into_a_clean_venv(tmp_path: Path, daemon: Daemon) -> None:
    # The user's path: a fresh venv and plain `pip install`, which builds in
    # isolation with setuptools and grpcio-tools from PyPI.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", "./client-sdk/python"])
    check = (
        "import sys, relay_sidecar\n"
        "assert 'proxystore' not in sys.modules\n"
        f"print(relay_sidecar.Client({daemon.socket!r}).status().uuid)\n"
    )
    assert run([python, "-c", check]).stdout.strip() == str(daemon.uuid)

    # The endpoint command comes along; without ProxyStore it still helps,
    # and says what to install.
    endpoint = str(env_dir / "bin" / "relay-sidecar-endpoint")
    assert "configure" in run([endpoint, "--help"]).stdout
    missing = run([endpoint, "list"], check=False)
    assert missing.returncode == 1
    assert "ProxyStore is not installed" in missing.stderr
    assert "pip install 'relay-sidecar[proxystore]'" in missing.stderr


def test_wheel_carries_the_generated_stubs(tmp_path: Path) -> None:
    build_wheel(PACKAGE, tmp_path)
    (wheel,) = tmp_path.glob("relay_sidecar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    generated = "relay_sidecar/_proto/relay_sidecar/v1/"
    for name in ("relay_sidecar_pb2.py", "relay_sidecar_pb2_grpc.py", "relay_sidecar_pb2.pyi"):
        assert generated + name in names, sorted(names)
    assert {
        "relay_sidecar/py.typed",
        "relay_sidecar/proxystore.py",
        "relay_sidecar/endpoint/cli.py",
    } <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "relay-sidecar-endpoint = relay_sidecar.endpoint.cli:main" in scripts
    stub = zipfile.ZipFile(wheel).read(generated + "relay_sidecar_pb2_grpc.py").decode()
    assert "from . import relay_sidecar_pb2" in stub


def test_sdist_carries_the_proto_and_builds(tmp_path: Path) -> None:
    # An sdist is built away from the repository, so it must carry the proto.
    source = copy_package(tmp_path / "repo" / "client-sdk" / "python")
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "repo" / "proto")
    run(
        [
            sys.executable,
            "-c",
            "from setuptools import build_meta; print(build_meta.build_sdist('dist'))",
        ],
        cwd=source,
    )
    (sdist,) = (source / "dist").glob("relay_sidecar-*.tar.gz")
    with tarfile.open(sdist) as archive:
        bundled = [
            n
            for n in archive.getnames()
            if n.endswith("proto/relay_sidecar/v1/relay_sidecar.proto")
        ]
        assert len(bundled) == 1, archive.getnames()
        if hasattr(tarfile, "data_filter"):
            archive.extractall(tmp_path / "unpacked", filter="data")
        else:  # pragma: no cover - Pythons without extraction filters
            archive.extractall(tmp_path / "unpacked")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    build_wheel(unpacked, tmp_path / "wheels")
    assert list((tmp_path / "wheels").glob("relay_sidecar-*.whl"))


def test_a_missing_proto_fails_the_build_naming_the_path(tmp_path: Path) -> None:
    source = copy_package(tmp_path / "elsewhere" / "client-sdk" / "python")
    result = build_wheel(source, tmp_path / "wheels", check=False)
    assert result.returncode != 0
    expected = tmp_path / "elsewhere" / "proto" / "relay_sidecar" / "v1" / "relay_sidecar.proto"
    assert str(expected) in result.stdout + result.stderr


def test_a_stale_proto_copy_fails_the_build(tmp_path: Path) -> None:
    source = copy_package(tmp_path / "repo" / "client-sdk" / "python")
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "repo" / "proto")
    stale = source / "proto" / "relay_sidecar" / "v1" / "relay_sidecar.proto"
    stale.parent.mkdir(parents=True)
    stale.write_text(PROTO.read_text().replace("uint64 delivered", "uint64 handed_over"))
    result = build_wheel(source, tmp_path / "wheels", check=False)
    assert result.returncode != 0
    assert "stale proto" in result.stdout + result.stderr
