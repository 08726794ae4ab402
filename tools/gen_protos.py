"""Generates the Python code of every proto under protos/ into one package.

The generated modules keep the proto package as their Python package (`steward.consent.v1`),
rooted at `services/_proto/`, so no import in them needs rewriting; pyproject maps the `steward`
package there. `make protos` runs this; `tests/test_codegen.py` runs it into a temporary folder
and fails when the committed code differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "services" / "_proto"
BIN = Path(sys.executable).parent
HEADER = '"""Generated from protos/ by `make protos`; do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))


def generate(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "__init__.py").write_text(HEADER)
    for directory in sorted(p for p in out.rglob("*") if p.is_dir()):
        (directory / "__init__.py").write_text(HEADER)
    (out / "steward" / "py.typed").write_text("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
