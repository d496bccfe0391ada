"""Build hook: generate the keyplane.v1 API from proto/ before packaging.

Generated code is built, never committed: both `pip install .` and `pip install -e .`
run this file, which runs protoc (from grpcio-tools, a build requirement) into gen/
before setuptools looks for the packages; build_py runs it again so that a
rebuild picks up proto changes.
"""

from __future__ import annotations

import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def generate_api() -> None:
    from grpc_tools import protoc  # build requirement, pinned to the grpcio version

    proto_root = ROOT / "proto"
    out = ROOT / "gen"
    package_dir = out / "keyplane" / "v1"
    package_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the keyplane.v1 API")
    (package_dir / "__init__.py").write_text(
        '"""Generated keyplane v1 API (built from proto/)."""\n'
    )
    (package_dir / "py.typed").write_text("")


class BuildPyWithApi(build_py):
    def run(self) -> None:
        generate_api()
        super().run()


generate_api()
if __name__ != "keyplane_generate_only":  # `make proto` runs this file only to generate
    setup(cmdclass={"build_py": BuildPyWithApi})
