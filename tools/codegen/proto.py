"""Regenerate the Python modules beside every .proto file under proto/.

`python -m tools.codegen.proto` writes them; `--check` exits 1 when the
checked-in modules differ from what the .proto files produce.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    include = Path(grpc_tools.__file__).parent / "_proto"
    # mypy-protobuf's stubs type enums and maps precisely (protoc's own .pyi do not).
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        for d in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = (out_dir / d) if d != Path(".") else None
            if init is not None and init != out_dir:
                (init / "__init__.py").touch()


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and (p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py")
    }


def checked_in(fresh: set[Path]) -> set[Path]:
    """The generated modules under proto/; an __init__.py counts only where protoc's output
    has one, so hand-written packages beside the generated ones (vmm.common) are left alone."""
    return {p for p in generated_files(PROTO_ROOT) if p.name != "__init__.py" or p in fresh}


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out)
        if check:
            current = checked_in(fresh)
            stale = sorted(
                str(p)
                for p in fresh | current
                if p not in fresh
                or p not in current
                or not filecmp.cmp(out / p, PROTO_ROOT / p, shallow=False)
            )
            if stale:
                print("generated protobuf modules are stale; run `make proto`:", *stale, sep="\n  ")
                return 1
            print(f"{len(fresh)} generated protobuf modules are fresh")
            return 0
        for old in checked_in(fresh) - fresh:
            (PROTO_ROOT / old).unlink()
        for path in fresh:
            (PROTO_ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / path, PROTO_ROOT / path)
        print(f"wrote {len(fresh)} generated protobuf modules under {PROTO_ROOT}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
