"""The parsers' fuzz targets (fuzz/*.py), short and deterministic, for every test run.

``make fuzz`` runs the same targets under atheris, coverage-guided, for minutes. Here each target
runs in-process over its seed corpus and a fixed number of seeded random mutations of it (bit
flips, byte and token insertions, cuts, repeats, splices): the same ``check`` functions, so a
finding of the long run, once fixed and added to a target's seeds, is checked on every run.
Atheris is not used here because instrumenting the ~5,000 functions loaded takes 15 to 25 s per
target on the 2-core machine before the first input runs (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"

# Iterations per target: about two seconds each on the development machine.
TARGETS = {
    "tcf": 20_000,
    "identifiers": 8_000,
    "rule_set": 400,
    "cel_condition": 1_500,
    "ledger_export": 800,
}

# Fragments the mutator splices in: what each parser's grammar cares about.
TOKENS: dict[str, Sequence[bytes]] = {
    "tcf": [b".", b"A", b"_", b"-", b"=", b"/", b"\x00", b"\xff\xff", b"AAAA"],
    "identifiers": [b"@", b".", b"+", b" ", b"\xc3\x9f", b"\xe1\xba\x9e", b"\xef\xac\x81", b"0"],
    "rule_set": [b"[", b"{", b"- ", b": ", b"\n", b"&a ", b"*a", b"!!", b"'", b'"', b"p."],
    "cel_condition": [
        b"(",
        b"[",
        b"!",
        b"-",
        b"p.",
        b" ? ",
        b" : ",
        b" / 0",
        b"9223372036854775807",
        b"1e308",
        b'"',
        b"has(",
        b"size(",
    ],
    "ledger_export": [b"{", b"}", b'"', b"\n", b"0", b"a", b",", b":", b"null", b"-1", b"1e999"],
}


def load_target(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"steward_fuzz_{name}", FUZZ_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mutate(
    rng: random.Random, data: bytes, corpus: Sequence[bytes], tokens: Sequence[bytes]
) -> bytes:
    """One to four random edits of ``data``, libFuzzer's usual kinds."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(buffer))
        kind = rng.randrange(7)
        if kind == 0 and buffer:  # flip a bit
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif kind == 1:  # insert random bytes
            buffer[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 2 and buffer:  # cut a range
            buffer[at : at + rng.randint(1, 16)] = b""
        elif kind == 3:  # insert a token of the grammar
            buffer[at:at] = rng.choice(tokens)
        elif kind == 4:  # repeat a token many times (nesting, length limits)
            buffer[at:at] = rng.choice(tokens) * rng.choice((2, 8, 64, 300, 3000))
        elif kind == 5 and buffer:  # duplicate a slice
            start = rng.randrange(len(buffer))
            buffer[at:at] = buffer[start : start + rng.randint(1, 64)]
        else:  # splice with another seed
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            buffer = buffer[:at] + other[cut:]
    return bytes(buffer)


def run_target(
    check: Callable[[bytes], None],
    seeds: Sequence[bytes],
    tokens: Sequence[bytes],
    iterations: int,
    seed: int,
) -> int:
    """Runs ``check`` on every seed and ``iterations`` mutants; returns how many inputs ran."""
    rng = random.Random(seed)
    corpus = list(seeds)
    inputs = [*seeds, *(b"" for _ in range(iterations))]
    for number, data in enumerate(inputs):
        if number >= len(seeds):
            data = mutate(rng, rng.choice(corpus), corpus, tokens)
        try:
            check(data)
        except Exception as error:
            pytest.fail(
                f"input {number} (seed {seed}): {type(error).__name__}: {error}\n"
                f"reproduce with check({data!r})",
                pytrace=True,
            )
        if number >= len(seeds) and rng.random() < 0.02:
            corpus.append(data)  # keep some mutants to mutate further
    return len(inputs)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_returns_a_valid_result_or_its_documented_error(name: str) -> None:
    target = load_target(name)
    ran = run_target(target.check, target.SEEDS, TOKENS[name], TARGETS[name], seed=9)
    assert ran == len(target.SEEDS) + TARGETS[name]


def test_the_mutator_is_deterministic_and_changes_its_input() -> None:
    seeds = [b"p.spend_90d >= 1.0"]
    first = [mutate(random.Random(1), seeds[0], seeds, TOKENS["cel_condition"]) for _ in range(5)]
    second = [mutate(random.Random(1), seeds[0], seeds, TOKENS["cel_condition"]) for _ in range(5)]
    assert first == second
    assert any(mutant != seeds[0] for mutant in first)
