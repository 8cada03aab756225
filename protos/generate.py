"""Generate the Python stubs (+ .pyi type stubs) from protos/ into the client distribution.

`python protos/generate.py` rewrites clients/python/src/llmsuite/<pkg>/v1/*_pb2*.py(i);
`python protos/generate.py --check` exits 1 if any committed stub differs
from what the protos produce (tests and CI run this, so a stale stub cannot
be imported). Compiled with `-I protos`, so generated imports are absolute
(`from llmsuite.common.v1 import common_pb2`) and need no rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
# The stubs ship in llmsuite-client (clients/python); its src/ is an import root.
PACKAGE_ROOT = REPO / "clients" / "python" / "src" / "llmsuite"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _protoc(out_dir: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _generated_files(root: Path) -> dict[Path, Path]:
    """Relative path under the `llmsuite` package -> absolute path."""
    return {
        p.relative_to(root): p
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        _protoc(Path(tmp))
        fresh = _generated_files(Path(tmp) / "llmsuite")
        committed = _generated_files(PACKAGE_ROOT)
        if args.check:
            stale = sorted(
                str(rel) for rel in fresh.keys() | committed.keys()
                if rel not in fresh or rel not in committed
                or not filecmp.cmp(fresh[rel], committed[rel], shallow=False)
            )
            if stale:
                print("stale generated stubs (run `make proto`):", *stale, sep="\n  ")
                return 1
            return 0
        for rel in committed.keys() - fresh.keys():
            committed[rel].unlink()
        for rel, src in fresh.items():
            dst = PACKAGE_ROOT / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (dst.parent / "__init__.py").touch()
            shutil.copyfile(src, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
