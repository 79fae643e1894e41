"""Generate the Python stubs of the wire contract.

    python -m services.feedback.codegen            # rewrite hitl/feedback/v1/*
    python -m services.feedback.codegen --check    # fail if the committed stubs drifted

The .proto tree under protos/ mirrors the import path (`hitl.feedback.v1`), so
the stubs land in the top-level `hitl/` package, which holds generated code only.
The generated files are committed; tests/services/feedback/test_codegen.py
regenerates them and fails on any difference.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = "hitl/feedback/v1/feedback.proto"
OUTPUTS = ("feedback_pb2.py", "feedback_pb2.pyi", "feedback_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on the contract, writing under out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{REPO / 'protos'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(REPO / "protos" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    package_dir = out_dir / Path(PROTO).parent
    return [package_dir / name for name in OUTPUTS]


def drifted() -> list[str]:
    """Names of committed stub files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_dir = REPO / Path(PROTO).parent
        return [
            f.name
            for f in fresh
            if not (committed_dir / f.name).exists()
            or not filecmp.cmp(f, committed_dir / f.name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        bad = drifted()
        if bad:
            print(f"generated stubs drifted from {PROTO}: {', '.join(bad)}", file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    for path in generate(REPO):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
