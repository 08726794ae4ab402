"""What every fuzz target shares: the atheris entry point, fed the target's own seed corpus.

A target is a module with ``check(data: bytes) -> None``, which returns when the parser gave a
valid result or raised its documented error, and raises anything else (an ``AssertionError`` for
a broken invariant, or the parser's unexpected exception), plus ``SEEDS``, valid and nearly valid
inputs to start from. ``python fuzz/<target>.py [libFuzzer flags] [corpus dirs]`` fuzzes it; with
no corpus directory the seeds are written to a temporary one.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def main(check: Callable[[bytes], None], seeds: Sequence[bytes]) -> None:
    import atheris

    # The parsers are loaded by now: instrumenting everything loaded gives atheris coverage of
    # them (and of iab-tcf, cel-python, lark, PyYAML, phonenumbers) without import tricks.
    atheris.instrument_all()
    arguments = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="steward-fuzz-") as directory:
        if not any(not argument.startswith("-") for argument in arguments):
            for number, seed in enumerate(seeds):
                (Path(directory) / f"seed-{number:03d}").write_bytes(seed)
            arguments = [*arguments, directory]
        atheris.Setup([sys.argv[0], *arguments], check)
        atheris.Fuzz()
