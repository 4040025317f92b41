"""Regenerate the checked-in protobuf modules, or check that they are fresh.

    python -m protos.generate          # rewrite protos/*_pb2*.py
    python -m protos.generate --check  # exit 1 if any checked-in file differs

Generation is pinned to one grpcio-tools release so the output is reproducible;
the floor of ``protobuf`` in pyproject.toml matches the runtime it embeds.
"""
from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.76.0"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under protos/ into out_dir/protos/."""
    from grpc_tools import protoc  # imported late: a test-only dependency

    installed = importlib.metadata.version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise SystemExit(
            f"grpcio-tools {installed} is installed; generation is pinned to "
            f"{GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )
    sources = sorted(p.relative_to(ROOT).as_posix() for p in HERE.glob("*.proto"))
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    # Paths are given relative to the repository root so that generated
    # imports read "from protos import x_pb2" and resolve without patching.
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def stale_files() -> list[str]:
    """Names of generated files whose checked-in copy differs or is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [f.name for f in fresh
                if not (HERE / f.name).exists() or not filecmp.cmp(f, HERE / f.name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: protos/{name} (run: python -m protos.generate)")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            (HERE / f.name).write_bytes(f.read_bytes())
            print(f"wrote protos/{f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
