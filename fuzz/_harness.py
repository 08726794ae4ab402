"""What every fuzz target shares: the atheris entry point, fed the target's own seed corpus.

A target is a module with ``check(data: bytes) -> None``, which returns when the parser gave a
valid result or raised its documented error, and raises anything else (an ``AssertionError`` for
a broken invariant, or the parser's unexpected exception), plus ``SEEDS``, valid and nearly valid
inputs to start from. ``python fuzz/<target>.py [libFuzzer flags] [corpus dirs]`` fuzzes it; with
no corpus directory the seeds are written to a temporary one.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def main(target_file: str, packages: Sequence[str]) -> None:
    """Fuzz the target in ``target_file`` with coverage of ``packages`` (top-level names).

    The target ran once as ``__main__`` without instrumentation; its parser modules are dropped
    and the target is loaded again inside ``atheris.instrument_imports``, so only the parsers and
    the libraries they lean on are instrumented (instrumenting everything loaded, grpc and
    SQLAlchemy included, takes minutes on a busy 2-core machine).
    """
    import atheris

    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            del sys.modules[name]
    with atheris.instrument_imports(include=list(packages)):
        spec = importlib.util.spec_from_file_location("steward_fuzz_target", target_file)
        assert spec is not None and spec.loader is not None
        target = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(target)
    arguments = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="steward-fuzz-") as directory:
        if not any(not argument.startswith("-") for argument in arguments):
            for number, seed in enumerate(target.SEEDS):
                (Path(directory) / f"seed-{number:03d}").write_bytes(seed)
            arguments = [*arguments, directory]
        atheris.Setup([sys.argv[0], *arguments], target.check)
        atheris.Fuzz()
