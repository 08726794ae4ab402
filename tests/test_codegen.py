"""The committed generated code must be exactly what `make protos` makes from protos/."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        found.extend(f"only committed: {prefix}{n}" for n in cmp.left_only)
        found.extend(f"only generated: {prefix}{n}" for n in cmp.right_only)
        for name in cmp.common_files:
            if (Path(cmp.left) / name).read_bytes() != (Path(cmp.right) / name).read_bytes():
                found.append(f"differs: {prefix}{name}")
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(comparison, "")
    return found


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    stale = _differences(ROOT / "services" / "_proto", out)
    assert not stale, "generated code is stale, run `make protos`:\n" + "\n".join(stale)
