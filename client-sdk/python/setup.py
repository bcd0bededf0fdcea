"""Build hook: compile the relay_sidecar.v1 contract into the package.

The gRPC stubs are generated from ``proto/relay_sidecar/v1/relay_sidecar.proto``
every time the package is built, never committed. The proto is taken from the
repository (``../../proto``, beside this package's directory) or, in an sdist,
from the copy the sdist carries (``proto/``). A missing proto, or an sdist copy
that differs from the repository's, stops the build.

The runtime requirements on grpcio and protobuf are those of the grpcio-tools
doing the generation: generated code refuses an older runtime at import time,
so pip has to know the bounds at install time.

Nothing is written into the source tree (except by an editable install,
which imports from it): setuptools' ``build/`` and ``*.egg-info`` go to a
temporary directory, so that a user can ``pip install`` from a checkout they
do not own (a shared one on a cluster).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import SetupError

HERE = Path(__file__).resolve().parent
PROTO_FILE = Path("relay_sidecar", "v1", "relay_sidecar.proto")
REPO_PROTO_ROOT = HERE.parent.parent / "proto"
SDIST_PROTO_ROOT = HERE / "proto"
SOURCE_PACKAGE = HERE / "src" / "relay_sidecar"


def proto_root() -> Path:
    """The directory holding ``relay_sidecar/v1/relay_sidecar.proto``."""
    repo, bundled = REPO_PROTO_ROOT / PROTO_FILE, SDIST_PROTO_ROOT / PROTO_FILE
    if repo.is_file():
        if bundled.is_file() and bundled.read_bytes() != repo.read_bytes():
            raise SetupError(
                f"stale proto: {bundled} differs from {repo}; delete {SDIST_PROTO_ROOT}"
            )
        return REPO_PROTO_ROOT
    if bundled.is_file():
        return SDIST_PROTO_ROOT
    raise SetupError(
        f"relay-sidecar's contract is missing: expected {repo} (building from the "
        f"repository) or {bundled} (building from an sdist)"
    )


def generate(package_dir: Path) -> None:
    """(Re)generates ``relay_sidecar._proto`` inside ``package_dir``."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    source = root / PROTO_FILE
    out_root = package_dir / "_proto"
    if out_root.exists():
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(source),
        ]
    )
    if code != 0:
        raise SetupError(f"grpc_tools.protoc failed (exit {code}) on {source}")

    # protoc writes `from relay_sidecar.v1 import ...`, an absolute import of
    # the proto's own package path; inside this package it must be relative.
    grpc_module = out_root / "relay_sidecar" / "v1" / "relay_sidecar_pb2_grpc.py"
    text, count = re.subn(
        r"^from relay_sidecar\.v1 import relay_sidecar_pb2 as",
        "from . import relay_sidecar_pb2 as",
        grpc_module.read_text(),
        flags=re.MULTILINE,
    )
    if count != 1:
        raise SetupError(f"unexpected import layout in generated {grpc_module}")
    grpc_module.write_text(text)

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    (out_root / "__init__.py").write_text(
        '"""Generated from relay_sidecar/v1/relay_sidecar.proto at build time; '
        'do not edit."""\n\n'
        f'PROTO_SHA256 = "{digest}"\n'
    )
    for package in (out_root / "relay_sidecar", out_root / "relay_sidecar" / "v1"):
        (package / "__init__.py").touch()


class BuildPyWithProto(build_py):
    """``build_py`` that also generates the gRPC stubs."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # The editable install imports straight from src/.
            generate(SOURCE_PACKAGE)
        else:
            generate(Path(self.build_lib, "relay_sidecar"))


class SdistWithProto(sdist):
    """``sdist`` that carries a copy of the proto, since ``../../proto`` is
    outside the package directory."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        source = proto_root() / PROTO_FILE
        target = Path(base_dir, "proto", PROTO_FILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def runtime_requirements() -> list[str]:
    """grpcio and protobuf, in the ranges the generating grpcio-tools needs."""
    wanted = {"grpcio", "protobuf"}
    found = []
    for requirement in importlib.metadata.requires("grpcio-tools") or []:
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
        if name.lower() in wanted and "extra ==" not in requirement:
            found.append(requirement)
            wanted.discard(name.lower())
    return found + sorted(wanted)


def out_of_tree() -> dict:
    """setuptools options that keep its ``build/`` and ``*.egg-info`` out of
    the source tree, in a temporary directory removed when this build step
    ends (its products are copied out before that: the wheel, the metadata
    directory pip asked for). An sdist keeps the default: it packs the
    egg-info from beside the sources."""
    if "sdist" in sys.argv or "egg_info" in sys.argv and "--egg-base" in sys.argv:
        return {}
    scratch = Path(tempfile.mkdtemp(prefix="relay-sidecar-build-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return {
        "build": {"build_base": str(scratch / "build")},
        "egg_info": {"egg_base": str(scratch)},
    }


setup(
    cmdclass={"build_py": BuildPyWithProto, "sdist": SdistWithProto},
    install_requires=runtime_requirements(),
    options=out_of_tree(),
)
