"""CEL tag conditions: parsed by cel-python, type-checked and compiled here.

cel-python's interpreter costs about 290 µs per evaluation, far too slow for re-evaluating every
rule on every event, so it only parses. The parse tree is checked against the profile catalogue
and compiled once into two evaluators that agree with each other and with CEL:

* a Python closure for one profile (a plain ``dict``, see :func:`profile.profile_dict`), and
* a vectorised numpy function for a whole population (:class:`profile.ProfileColumns`).

``CompiledCondition.interpret`` still runs cel-python's interpreter on the checked expression;
property tests use it as the reference the compiled paths must match.

The supported subset: ``p.<field>``; ``p.<map>["key"]`` (or ``p.<map>.key``); ``"key" in
p.<map>``; ``has(p.<map>.key)``; ``size(p.<map>)``; ``x in [literals]``; int, double, string and
bool literals; ``+ - * / %``; ``== != < <= > >=``; ``&& || !``; ``?:``; parentheses; ``double()``
and ``int()``. Anything else is refused with an error naming the construct.

Semantics, where CEL leaves a choice or where Steward departs from it:

* **Sparse maps.** A map key the profile lacks reads as 0 (0.0 for maps of doubles) instead of
  raising CEL's "no such key"; a key whose value is 0 counts as absent for ``in``, ``has()``
  and ``size()``. The profile's maps are counts and shares, where absent and 0 mean the same.
* **Numbers mix.** Where an int meets a double (arithmetic, comparison, ``?:`` branches, list
  membership) the int is converted to double, as if written ``double(x)``: ``p.spend_90d >= 500``
  means ``p.spend_90d >= 500.0``. Two ints stay int: CEL's int64 arithmetic, division truncating
  toward zero (``7 / 2 == 3``) and overflow being an error.
* **Errors make a condition false.** Division (or ``%``) by zero, int overflow and ``int()`` of
  a value out of range are errors. As in CEL, ``false && error`` is false and ``true || error``
  is true in either operand order, and any other error reaching the top makes the whole condition
  false. Dividing a double by zero is an error too (CEL would give infinity): a person without
  orders must not match ``p.spend_90d / p.orders_90d > 100.0``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import operator
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import celpy
import lark
import numpy as np
import numpy.typing as npt
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, celstr
from lark.exceptions import UnexpectedCharacters, UnexpectedToken

from services.tagging.profile import (
    EMPTY_MAP,
    KNOWN_MAP_KEYS,
    PROFILE_FIELDS,
    CelType,
    FieldValue,
    ProfileColumns,
    default_value,
)

PROFILE_VARIABLE: Final = "p"
MAX_CONDITION_LENGTH: Final = 2000
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
SUPPORTED_FUNCTIONS: Final = ("size", "has", "double", "int")
_MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})


class ConditionError(ValueError):
    """A condition that cannot be compiled; the message names the construct at fault."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None) -> None:
        where = ""
        if column is not None:
            where = (
                f" (column {column})" if line in (None, 1) else f" (line {line}, column {column})"
            )
        super().__init__(message + where)
        self.message = message
        self.line = line
        self.column = column


Closure: TypeAlias = Callable[[Mapping[str, Any]], Any]
BatchResult: TypeAlias = tuple[Any, Any]
"""Values and an error mask (``None`` when no row can be in error)."""
Batch: TypeAlias = Callable[[ProfileColumns], BatchResult]
Getter: TypeAlias = Callable[[Mapping[str, Any]], FieldValue]


class _NoLiteral:
    pass


_NOT_LITERAL: Final = _NoLiteral()


@dataclass(frozen=True, slots=True)
class _Node:
    """A typed sub-expression with its three back ends."""

    type: CelType
    closure: Closure
    batch: Batch
    cel: str
    literal: Any = _NOT_LITERAL
    map_key: tuple[str, str] | None = None
    """``(field, key)`` when this node reads one map key by field selection (``p.m.key``)."""


@dataclass(frozen=True, slots=True)
class _ProfileRef:
    pass


@dataclass(frozen=True, slots=True)
class _MapRef:
    name: str
    type: CelType


@dataclass(frozen=True, slots=True)
class _ListLiteral:
    values: tuple[Any, ...]
    types: tuple[CelType, ...]


_Operand: TypeAlias = _Node | _ProfileRef | _MapRef | _ListLiteral


# Run-time helpers of the closure path ------------------------------------------------------------


def _int64(value: int) -> int:
    if INT64_MIN <= value <= INT64_MAX:
        return value
    raise OverflowError("int64 overflow")


def _int_divide(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero")
    quotient = abs(a) // abs(b)
    return _int64(-quotient if (a < 0) != (b < 0) else quotient)


def _int_modulo(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("modulo by zero")
    remainder = abs(a) % abs(b)
    return -remainder if a < 0 else remainder


def _double_to_int(value: float) -> int:
    if not math.isfinite(value):
        raise OverflowError("int() of a non-finite double")
    return _int64(math.trunc(value))


def _nonzero_count(values: Any) -> int:
    return len(values) - operator.countOf(values, 0)


# Run-time helpers of the batch path --------------------------------------------------------------


def _errors(*masks: Any) -> Any:
    present = [mask for mask in masks if mask is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        combined = combined | mask
    return combined


def _where_nonzero(divisor: Any) -> tuple[Any, Any]:
    zero = divisor == 0
    return zero, np.where(zero, 1, divisor)


def _batch_int_arithmetic(op: str, a: Any, b: Any) -> BatchResult:
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if op == "+":
        result = a + b
        return result, ((a ^ result) & (b ^ result)) < 0
    if op == "-":
        result = a - b
        return result, ((a ^ b) & (a ^ result)) < 0
    if op == "*":
        result = a * b
        minus_one = a == -1
        safe_a = np.where((a == 0) | minus_one, 1, a)
        wrong = (a != 0) & ~minus_one & (result // safe_a != b)
        return result, wrong | (minus_one & (b == INT64_MIN))
    zero, safe_b = _where_nonzero(b)
    overflow = (a == INT64_MIN) & (b == -1)
    safe_b = np.where(overflow, 1, safe_b)
    remainder = np.fmod(a, safe_b)
    if op == "%":
        return remainder, zero
    return (a - remainder) // safe_b, zero | overflow


def _batch_double_arithmetic(op: str, a: Any, b: Any) -> BatchResult:
    if op == "+":
        return a + b, None
    if op == "-":
        return a - b, None
    if op == "*":
        return a * b, None
    zero, safe_b = _where_nonzero(b)
    return a / safe_b, zero


def _batch_double_to_int(values: Any) -> BatchResult:
    truncated = np.trunc(values)
    bad = ~np.isfinite(truncated) | (truncated < -(2.0**63)) | (truncated >= 2.0**63)
    return np.where(bad, 0, truncated).astype(np.int64), bad


# Compilation --------------------------------------------------------------------------------------


_COMPARISONS: Final[Mapping[str, tuple[str, Callable[[Any, Any], Any]]]] = {
    "relation_lt": ("<", operator.lt),
    "relation_le": ("<=", operator.le),
    "relation_gt": (">", operator.gt),
    "relation_ge": (">=", operator.ge),
    "relation_eq": ("==", operator.eq),
    "relation_ne": ("!=", operator.ne),
}
_ARITHMETIC: Final[Mapping[str, str]] = {
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
}


def _position(item: lark.Tree[Any] | lark.Token) -> dict[str, int | None]:
    if isinstance(item, lark.Token):
        return {"line": item.line, "column": item.column}
    meta = item.meta
    return {"line": getattr(meta, "line", None), "column": getattr(meta, "column", None)}


def _literal_cel(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def _suggest(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {listed}?)"


def _describe(operand: _Operand) -> str:
    if isinstance(operand, _Node):
        return operand.type.value
    if isinstance(operand, _MapRef):
        return f"the map p.{operand.name}"
    if isinstance(operand, _ListLiteral):
        return "a list"
    return "the profile p itself"


class _Compiler:
    """Walks cel-python's parse tree once, checking types and building the three back ends."""

    def __init__(self) -> None:
        self.reads: dict[str, Getter] = {}
        self.literals: list[str] = []

    # Errors and operand shapes

    def error(self, message: str, item: lark.Tree[Any] | lark.Token) -> ConditionError:
        return ConditionError(message, **_position(item))

    def value(self, operand: _Operand, item: lark.Tree[Any]) -> _Node:
        if isinstance(operand, _Node):
            return operand
        if isinstance(operand, _MapRef):
            example = f'p.{operand.name}["<key>"]'
            raise self.error(
                f"p.{operand.name} is a map: read one key ({example}), test a key "
                f'("<key>" in p.{operand.name}) or count keys (size(p.{operand.name}))',
                item,
            )
        if isinstance(operand, _ListLiteral):
            raise self.error("a list literal may only follow `in`", item)
        raise self.error("`p` is the whole profile: read a field, e.g. p.spend_90d", item)

    def child(self, tree: lark.Tree[Any], index: int) -> _Node:
        sub = tree.children[index]
        assert isinstance(sub, lark.Tree)
        return self.value(self.visit(sub), sub)

    # Dispatch

    def visit(self, tree: lark.Tree[Any]) -> _Operand:
        handler = getattr(self, f"on_{tree.data}", None)
        if handler is None:
            raise self.error(f"unsupported construct: {tree.data}", tree)
        result: _Operand = handler(tree)
        return result

    def passthrough(self, tree: lark.Tree[Any]) -> _Operand:
        sub = tree.children[0]
        assert isinstance(sub, lark.Tree)
        return self.visit(sub)

    on_member = passthrough
    on_primary = passthrough

    def on_paren_expr(self, tree: lark.Tree[Any]) -> _Operand:
        inner = self.passthrough(tree)
        if isinstance(inner, _Node):
            return _Node(inner.type, inner.closure, inner.batch, f"({inner.cel})", inner.literal)
        return inner

    def on_expr(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        condition = self.child(tree, 0)
        if condition.type is not CelType.BOOL:
            raise self.error(
                f"the condition of ?: must be a bool, not {condition.type.value}", tree
            )
        when_true, when_false = self.child(tree, 1), self.child(tree, 2)
        when_true, when_false, result_type = self.unify(when_true, when_false, "?:", tree)
        return self.ternary(condition, when_true, when_false, result_type)

    def on_conditionalor(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        return self.logical("||", self.child(tree, 0), self.child(tree, 1), tree)

    def on_conditionaland(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        return self.logical("&&", self.child(tree, 0), self.child(tree, 1), tree)

    def on_relation(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        op_tree, right_tree = tree.children
        assert isinstance(op_tree, lark.Tree) and isinstance(right_tree, lark.Tree)
        left_tree = op_tree.children[0]
        assert isinstance(left_tree, lark.Tree)
        if op_tree.data == "relation_in":
            return self.membership(self.visit(left_tree), self.visit(right_tree), tree)
        symbol, compare = _COMPARISONS[str(op_tree.data)]
        left = self.value(self.visit(left_tree), left_tree)
        right = self.value(self.visit(right_tree), right_tree)
        return self.comparison(symbol, compare, left, right, tree)

    def on_addition(self, tree: lark.Tree[Any]) -> _Operand:
        return self.binary_arithmetic(tree)

    def on_multiplication(self, tree: lark.Tree[Any]) -> _Operand:
        return self.binary_arithmetic(tree)

    def binary_arithmetic(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        op_tree, right_tree = tree.children
        assert isinstance(op_tree, lark.Tree) and isinstance(right_tree, lark.Tree)
        left_tree = op_tree.children[0]
        assert isinstance(left_tree, lark.Tree)
        left = self.value(self.visit(left_tree), left_tree)
        right = self.value(self.visit(right_tree), right_tree)
        return self.arithmetic(_ARITHMETIC[str(op_tree.data)], left, right, tree)

    def on_unary(self, tree: lark.Tree[Any]) -> _Operand:
        if len(tree.children) == 1:
            return self.passthrough(tree)
        op_tree = tree.children[0]
        assert isinstance(op_tree, lark.Tree)
        operand = self.child(tree, 1)
        if op_tree.data == "unary_not":
            if operand.type is not CelType.BOOL:
                raise self.error(f"! needs a bool, not {operand.type.value}", tree)
            inner, inner_batch = operand.closure, operand.batch

            def negate(p: Mapping[str, Any]) -> Any:
                return not inner(p)

            def negate_batch(columns: ProfileColumns) -> BatchResult:
                values, errors = inner_batch(columns)
                result = ~np.asarray(values, dtype=bool)
                return (result if errors is None else result & ~errors), errors

            return _Node(CelType.BOOL, negate, negate_batch, f"!{operand.cel}")
        if not operand.type.is_number:
            raise self.error(f"unary - needs a number, not {operand.type.value}", tree)
        return self.negation(operand)

    # Members: fields, map keys, calls

    def on_ident(self, tree: lark.Tree[Any]) -> _Operand:
        token = tree.children[0]
        assert isinstance(token, lark.Token)
        if token.value == PROFILE_VARIABLE:
            return _ProfileRef()
        hint = f" (did you mean p.{token.value}?)" if token.value in PROFILE_FIELDS else ""
        raise self.error(
            f"unknown name {token.value!r}: conditions read the profile as p.<field>{hint}", tree
        )

    def on_member_dot(self, tree: lark.Tree[Any]) -> _Operand:
        member_tree, token = tree.children
        assert isinstance(member_tree, lark.Tree) and isinstance(token, lark.Token)
        member = self.visit(member_tree)
        name = str(token.value)
        if isinstance(member, _ProfileRef):
            return self.profile_field(name, token)
        if isinstance(member, _MapRef):
            return self.map_entry(member, name, token, by_selection=True)
        raise self.error(f"{_describe(member)} has no field {name!r}", token)

    def on_member_index(self, tree: lark.Tree[Any]) -> _Operand:
        member_tree, index_tree = tree.children
        assert isinstance(member_tree, lark.Tree) and isinstance(index_tree, lark.Tree)
        member = self.visit(member_tree)
        if isinstance(member, _ProfileRef):
            raise self.error('read profile fields as p.<field>, not p["<field>"]', tree)
        if not isinstance(member, _MapRef):
            raise self.error(f"[...] needs a map field, not {_describe(member)}", tree)
        key = self.string_literal(self.visit(index_tree), index_tree, "a map key")
        return self.map_entry(member, key, index_tree, by_selection=False)

    def on_member_dot_arg(self, tree: lark.Tree[Any]) -> _Operand:
        member_tree, token, *rest = tree.children
        assert isinstance(member_tree, lark.Tree) and isinstance(token, lark.Token)
        name = str(token.value)
        if name in _MACROS:
            raise self.error(f"unsupported macro {name}()", token)
        if name != "size":
            raise self.error(
                f"unsupported method .{name}(): supported functions are "
                f"{', '.join(SUPPORTED_FUNCTIONS)}",
                token,
            )
        if rest:
            raise self.error(".size() takes no arguments", token)
        return self.size(self.visit(member_tree), tree)

    def on_ident_arg(self, tree: lark.Tree[Any]) -> _Operand:
        token, *rest = tree.children
        assert isinstance(token, lark.Token)
        name = str(token.value)
        arguments: list[lark.Tree[Any]] = []
        if rest:
            exprlist = rest[0]
            assert isinstance(exprlist, lark.Tree)
            arguments = [arg for arg in exprlist.children if isinstance(arg, lark.Tree)]
        if name not in SUPPORTED_FUNCTIONS:
            raise self.error(
                f"unsupported function {name}(): supported functions are "
                f"{', '.join(SUPPORTED_FUNCTIONS)}",
                token,
            )
        if len(arguments) != 1:
            raise self.error(f"{name}() takes exactly one argument", token)
        argument = self.visit(arguments[0])
        if name == "size":
            return self.size(argument, tree)
        if name == "has":
            if isinstance(argument, _Node) and argument.map_key is not None:
                return self.map_has(*argument.map_key)
            raise self.error(
                "has() tests a map key by field selection, e.g. has(p.category_affinity.outdoor)",
                tree,
            )
        operand = self.value(argument, arguments[0])
        if not operand.type.is_number:
            raise self.error(f"{name}() needs a number, not {operand.type.value}", tree)
        if name == "double":
            return self.to_double(operand, explicit=True)
        return self.to_int(operand)

    def on_dot_ident(self, tree: lark.Tree[Any]) -> _Operand:
        raise self.error("names with a leading dot are not supported", tree)

    on_dot_ident_arg = on_dot_ident

    def on_member_object(self, tree: lark.Tree[Any]) -> _Operand:
        raise self.error("message construction is not supported", tree)

    def on_map_lit(self, tree: lark.Tree[Any]) -> _Operand:
        raise self.error("map literals are not supported", tree)

    def on_list_lit(self, tree: lark.Tree[Any]) -> _Operand:
        values: list[Any] = []
        types: list[CelType] = []
        if tree.children:
            exprlist = tree.children[0]
            assert isinstance(exprlist, lark.Tree)
            for element in exprlist.children:
                assert isinstance(element, lark.Tree)
                node = self.value(self.visit(element), element)
                if node.literal is _NOT_LITERAL:
                    raise self.error("list elements must be literals", element)
                values.append(node.literal)
                types.append(node.type)
        return _ListLiteral(tuple(values), tuple(types))

    def on_literal(self, tree: lark.Tree[Any]) -> _Operand:
        token = tree.children[0]
        assert isinstance(token, lark.Token)
        kind, text = token.type, str(token.value)
        if kind == "INT_LIT":
            negative = text.startswith("-")
            digits = text.lstrip("-")
            number = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits)
            number = -number if negative else number
            if not INT64_MIN <= number <= INT64_MAX:
                raise self.error(f"int literal {text} is out of the int64 range", token)
            return self.literal(number, CelType.INT)
        if kind == "FLOAT_LIT":
            double = float(text)
            if not math.isfinite(double):
                raise self.error(f"double literal {text} is out of range", token)
            return self.literal(double, CelType.DOUBLE)
        if kind in ("STRING_LIT", "MLSTRING_LIT"):
            value = str(celstr(token))
            self.literals.append(value)
            return self.literal(value, CelType.STRING)
        if kind == "BOOL_LIT":
            return self.literal(text == "true", CelType.BOOL)
        if kind == "UINT_LIT":
            raise self.error(f"unsigned int literals ({text}) are not supported", token)
        if kind == "BYTES_LIT":
            raise self.error("bytes literals are not supported", token)
        if kind == "NULL_LIT":
            raise self.error("null is not supported", token)
        raise self.error(f"unsupported literal {text}", token)

    # Builders

    def literal(self, value: Any, cel_type: CelType) -> _Node:
        if cel_type is CelType.INT:
            batch_value: Any = np.int64(value)
        elif cel_type is CelType.DOUBLE:
            batch_value = np.float64(value)
        elif cel_type is CelType.BOOL:
            batch_value = np.bool_(value)
        else:
            batch_value = value

        def constant(p: Mapping[str, Any]) -> Any:
            return value

        def constant_batch(columns: ProfileColumns) -> BatchResult:
            return batch_value, None

        return _Node(cel_type, constant, constant_batch, _literal_cel(value), literal=value)

    def string_literal(self, operand: _Operand, item: lark.Tree[Any], what: str) -> str:
        if isinstance(operand, _Node) and isinstance(operand.literal, str):
            return operand.literal
        raise self.error(f"{what} must be a string literal", item)

    def profile_field(self, name: str, token: lark.Token) -> _Operand:
        cel_type = PROFILE_FIELDS.get(name)
        if cel_type is None:
            raise self.error(f"unknown field p.{name}{_suggest(name, list(PROFILE_FIELDS))}", token)
        if cel_type.is_map:
            return _MapRef(name, cel_type)
        default = default_value(cel_type)

        def read(p: Mapping[str, Any]) -> Any:
            return p.get(name, default)

        def read_batch(columns: ProfileColumns) -> BatchResult:
            return columns.scalar(name), None

        self.reads.setdefault(name, read)
        return _Node(cel_type, read, read_batch, f"p.{name}")

    def map_entry(
        self, ref: _MapRef, key: str, item: lark.Tree[Any] | lark.Token, *, by_selection: bool
    ) -> _Node:
        known = KNOWN_MAP_KEYS.get(ref.name)
        if known is not None and key not in known:
            raise self.error(
                f"unknown key {key!r} of p.{ref.name}{_suggest(key, known)}; "
                f"its keys are {', '.join(known)}",
                item,
            )
        name = ref.name
        zero = 0 if ref.type is CelType.MAP_INT else 0.0

        def read(p: Mapping[str, Any]) -> Any:
            return (p.get(name) or EMPTY_MAP).get(key, zero)

        def read_batch(columns: ProfileColumns) -> BatchResult:
            return columns.map_values(name, key), None

        self.literals.append(key)
        self.reads.setdefault(f"{name}[{json.dumps(key, ensure_ascii=False)}]", read)
        return _Node(
            ref.type.value_type,
            read,
            read_batch,
            f"p.{name}[{_literal_cel(key)}]",
            map_key=(name, key) if by_selection else None,
        )

    def map_has(self, name: str, key: str) -> _Node:
        def has(p: Mapping[str, Any]) -> Any:
            return bool((p.get(name) or EMPTY_MAP).get(key, 0))

        def has_batch(columns: ProfileColumns) -> BatchResult:
            return columns.map_values(name, key) != 0, None

        return _Node(CelType.BOOL, has, has_batch, f"({_literal_cel(key)} in p.{name})")

    def size(self, operand: _Operand, tree: lark.Tree[Any]) -> _Node:
        if not isinstance(operand, _MapRef):
            raise self.error(f"size() takes a map field, not {_describe(operand)}", tree)
        name = operand.name

        def count(p: Mapping[str, Any]) -> Any:
            return _nonzero_count((p.get(name) or EMPTY_MAP).values())

        def count_batch(columns: ProfileColumns) -> BatchResult:
            return columns.map_sizes(name), None

        def whole_map(p: Mapping[str, Any]) -> FieldValue:
            return {k: v for k, v in dict(p.get(name) or {}).items() if v}

        self.reads.setdefault(name, whole_map)
        return _Node(CelType.INT, count, count_batch, f"size(p.{name})")

    def membership(self, left: _Operand, right: _Operand, tree: lark.Tree[Any]) -> _Node:
        if isinstance(right, _MapRef):
            key = self.string_literal(left, tree, "the key before `in` a map")
            self.map_entry(right, key, tree, by_selection=False)
            return self.map_has(right.name, key)
        if not isinstance(right, _ListLiteral):
            raise self.error(
                f"`in` needs a map field or a list literal on its right, not {_describe(right)}",
                tree,
            )
        item = self.value(left, tree)
        promote = item.type is CelType.DOUBLE or (
            item.type is CelType.INT and CelType.DOUBLE in right.types
        )
        values: list[Any] = []
        for value, value_type in zip(right.values, right.types, strict=True):
            if value_type is item.type or (promote and value_type.is_number):
                values.append(float(value) if promote else value)
            else:
                raise self.error(
                    f"cannot test whether {item.type.value} is in a list holding "
                    f"{value_type.value}",
                    tree,
                )
        if promote:
            item = self.to_double(item, explicit=False)
        members = frozenset(values)
        batch_members = tuple(values)
        inner, inner_batch = item.closure, item.batch

        def contains(p: Mapping[str, Any]) -> Any:
            return inner(p) in members

        def contains_batch(columns: ProfileColumns) -> BatchResult:
            found, errors = inner_batch(columns)
            result: Any = np.zeros(np.shape(found), dtype=bool)
            for member in batch_members:
                result = result | (found == member)
            return result, errors

        listed = ", ".join(_literal_cel(v) for v in values)
        return _Node(CelType.BOOL, contains, contains_batch, f"({item.cel} in [{listed}])")

    def to_double(self, node: _Node, *, explicit: bool) -> _Node:
        if node.type is CelType.DOUBLE:
            return node
        if node.literal is not _NOT_LITERAL and not explicit:
            return self.literal(float(node.literal), CelType.DOUBLE)
        inner, inner_batch = node.closure, node.batch

        def convert(p: Mapping[str, Any]) -> Any:
            return float(inner(p))

        def convert_batch(columns: ProfileColumns) -> BatchResult:
            values, errors = inner_batch(columns)
            return np.asarray(values, dtype=np.float64), errors

        return _Node(CelType.DOUBLE, convert, convert_batch, f"double({node.cel})")

    def to_int(self, node: _Node) -> _Node:
        if node.type is CelType.INT:
            return node
        inner, inner_batch = node.closure, node.batch

        def convert(p: Mapping[str, Any]) -> Any:
            return _double_to_int(inner(p))

        def convert_batch(columns: ProfileColumns) -> BatchResult:
            values, errors = inner_batch(columns)
            converted, bad = _batch_double_to_int(values)
            return converted, _errors(errors, bad)

        return _Node(CelType.INT, convert, convert_batch, f"int({node.cel})")

    def unify(
        self, left: _Node, right: _Node, symbol: str, tree: lark.Tree[Any]
    ) -> tuple[_Node, _Node, CelType]:
        if left.type is right.type:
            return left, right, left.type
        if left.type.is_number and right.type.is_number:
            return (
                self.to_double(left, explicit=False),
                self.to_double(right, explicit=False),
                CelType.DOUBLE,
            )
        raise self.error(f"{symbol} cannot combine {left.type.value} with {right.type.value}", tree)

    def comparison(
        self,
        symbol: str,
        compare: Callable[[Any, Any], Any],
        left: _Node,
        right: _Node,
        tree: lark.Tree[Any],
    ) -> _Node:
        if not (left.type.is_number and right.type.is_number) and left.type is not right.type:
            raise self.error(
                f"cannot compare {left.type.value} with {right.type.value} using {symbol}", tree
            )
        if symbol not in ("==", "!=") and left.type not in (
            CelType.INT,
            CelType.DOUBLE,
            CelType.STRING,
        ):
            raise self.error(f"{symbol} orders numbers or strings, not {left.type.value}", tree)
        left, right, _ = self.unify(left, right, symbol, tree)
        closure = _binary_closure(compare, left, right)
        left_batch, right_batch = left.batch, right.batch

        def compare_batch(columns: ProfileColumns) -> BatchResult:
            a, a_errors = left_batch(columns)
            b, b_errors = right_batch(columns)
            return np.asarray(compare(a, b), dtype=bool), _errors(a_errors, b_errors)

        return _Node(CelType.BOOL, closure, compare_batch, f"({left.cel} {symbol} {right.cel})")

    def arithmetic(self, symbol: str, left: _Node, right: _Node, tree: lark.Tree[Any]) -> _Node:
        if not (left.type.is_number and right.type.is_number):
            bad = left if not left.type.is_number else right
            raise self.error(f"{symbol} needs numbers, not {bad.type.value}", tree)
        if symbol == "%" and not (left.type is CelType.INT and right.type is CelType.INT):
            raise self.error("% needs two ints", tree)
        left, right, result_type = self.unify(left, right, symbol, tree)
        left_batch, right_batch = left.batch, right.batch
        closure: Closure
        if result_type is CelType.INT:
            closure = _int_closure(symbol, left, right)
            batch_op = _batch_int_arithmetic
        else:
            closure = _binary_closure(_DOUBLE_OPERATORS[symbol], left, right)
            batch_op = _batch_double_arithmetic

        def arithmetic_batch(columns: ProfileColumns) -> BatchResult:
            a, a_errors = left_batch(columns)
            b, b_errors = right_batch(columns)
            values, errors = batch_op(symbol, a, b)
            return values, _errors(a_errors, b_errors, errors)

        return _Node(result_type, closure, arithmetic_batch, f"({left.cel} {symbol} {right.cel})")

    def negation(self, operand: _Node) -> _Node:
        inner, inner_batch = operand.closure, operand.batch
        if operand.type is CelType.INT:

            def negate(p: Mapping[str, Any]) -> Any:
                return _int64(-inner(p))

            def negate_batch(columns: ProfileColumns) -> BatchResult:
                values, errors = inner_batch(columns)
                values = np.asarray(values, dtype=np.int64)
                return -values, _errors(errors, values == INT64_MIN)

        else:

            def negate(p: Mapping[str, Any]) -> Any:
                return -inner(p)

            def negate_batch(columns: ProfileColumns) -> BatchResult:
                values, errors = inner_batch(columns)
                return -values, errors

        return _Node(operand.type, negate, negate_batch, f"(-{operand.cel})")

    def logical(self, symbol: str, left: _Node, right: _Node, tree: lark.Tree[Any]) -> _Node:
        for side in (left, right):
            if side.type is not CelType.BOOL:
                raise self.error(f"{symbol} needs bools, not {side.type.value}", tree)
        first, second = left.closure, right.closure
        first_batch, second_batch = left.batch, right.batch
        # CEL's && and || are commutative over errors: the deciding value wins from either side.
        decisive = symbol == "||"
        combine: Closure
        if decisive:

            def combine(p: Mapping[str, Any]) -> Any:
                try:
                    a = first(p)
                except ArithmeticError:
                    if second(p):
                        return True
                    raise
                return True if a else bool(second(p))

        else:

            def combine(p: Mapping[str, Any]) -> Any:
                try:
                    a = first(p)
                except ArithmeticError:
                    if not second(p):
                        return False
                    raise
                return bool(second(p)) if a else False

        def combine_batch(columns: ProfileColumns) -> BatchResult:
            a, a_errors = first_batch(columns)
            b, b_errors = second_batch(columns)
            a_decides = (a if decisive else ~np.asarray(a, dtype=bool)) & _valid(a_errors)
            b_decides = (b if decisive else ~np.asarray(b, dtype=bool)) & _valid(b_errors)
            decided = a_decides | b_decides
            errors = _errors(a_errors, b_errors)
            if errors is not None:
                errors = errors & ~decided
            if decisive:
                return decided, errors
            return ~decided & _valid(errors), errors

        return _Node(CelType.BOOL, combine, combine_batch, f"({left.cel} {symbol} {right.cel})")

    def ternary(
        self, condition: _Node, when_true: _Node, when_false: _Node, result_type: CelType
    ) -> _Node:
        test, yes, no = condition.closure, when_true.closure, when_false.closure
        test_batch, yes_batch, no_batch = condition.batch, when_true.batch, when_false.batch

        def choose(p: Mapping[str, Any]) -> Any:
            return yes(p) if test(p) else no(p)

        def choose_batch(columns: ProfileColumns) -> BatchResult:
            c, c_errors = test_batch(columns)
            a, a_errors = yes_batch(columns)
            b, b_errors = no_batch(columns)
            values = np.where(c, a, b)
            branch_errors = None
            if a_errors is not None or b_errors is not None:
                branch_errors = np.where(
                    c,
                    False if a_errors is None else a_errors,
                    False if b_errors is None else b_errors,
                )
            return values, _errors(c_errors, branch_errors)

        return _Node(
            result_type,
            choose,
            choose_batch,
            f"({condition.cel} ? {when_true.cel} : {when_false.cel})",
        )


def _valid(errors: Any) -> Any:
    return True if errors is None else ~errors


_DOUBLE_OPERATORS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


def _binary_closure(op: Callable[[Any, Any], Any], left: _Node, right: _Node) -> Closure:
    """``op(left, right)`` with a literal operand captured as a constant (one call fewer)."""
    a, b = left.closure, right.closure
    if right.literal is not _NOT_LITERAL:
        constant = right.literal

        def with_constant_right(p: Mapping[str, Any]) -> Any:
            return op(a(p), constant)

        return with_constant_right
    if left.literal is not _NOT_LITERAL:
        constant = left.literal

        def with_constant_left(p: Mapping[str, Any]) -> Any:
            return op(constant, b(p))

        return with_constant_left

    def both(p: Mapping[str, Any]) -> Any:
        return op(a(p), b(p))

    return both


def _int_closure(symbol: str, left: _Node, right: _Node) -> Closure:
    if symbol == "/":
        return _binary_closure(_int_divide, left, right)
    if symbol == "%":
        return _binary_closure(_int_modulo, left, right)
    op = {"+": operator.add, "-": operator.sub, "*": operator.mul}[symbol]
    unchecked = _binary_closure(op, left, right)

    def checked(p: Mapping[str, Any]) -> Any:
        return _int64(unchecked(p))

    return checked


# The compiled condition ---------------------------------------------------------------------------


class _SparseMap(celtypes.MapType):
    """A profile map for cel-python: an absent key reads as 0, as on the compiled paths."""

    def __init__(self, items: Mapping[Any, Any], zero: Any) -> None:
        super().__init__(items)
        self.zero = zero

    def __missing__(self, key: Any) -> Any:
        return self.zero


def _cel_divide(a: Any, b: Any) -> Any:
    if float(b) == 0.0:
        raise ZeroDivisionError("division by zero")
    return operator.truediv(a, b)


_CEL_FUNCTIONS: Final = {"_/_": _cel_divide}


def _cel_profile(profile: Mapping[str, Any]) -> celtypes.MapType:
    values: dict[Any, Any] = {}
    for name, cel_type in PROFILE_FIELDS.items():
        value: Any = profile.get(name)
        if value is None:
            value = default_value(cel_type)
        if cel_type is CelType.INT:
            values[celtypes.StringType(name)] = celtypes.IntType(int(value))
        elif cel_type is CelType.DOUBLE:
            values[celtypes.StringType(name)] = celtypes.DoubleType(float(value))
        elif cel_type is CelType.STRING:
            values[celtypes.StringType(name)] = celtypes.StringType(str(value))
        else:
            integer = cel_type is CelType.MAP_INT
            wrap: Callable[[Any], Any] = celtypes.IntType if integer else celtypes.DoubleType
            entries = {
                celtypes.StringType(k): wrap(int(v) if integer else float(v))
                for k, v in dict(value).items()
                if v
            }
            zero = celtypes.IntType(0) if integer else celtypes.DoubleType(0.0)
            values[celtypes.StringType(name)] = _SparseMap(entries, zero)
    return celtypes.MapType(values)


_PARSER_LOCK: Final = threading.Lock()


@functools.cache
def _environment() -> celpy.Environment:
    return celpy.Environment()


def _parse(text: str) -> lark.Tree[Any]:
    with _PARSER_LOCK:
        try:
            tree: lark.Tree[Any] = _environment().compile(text)
        except CELParseError as error:
            raise _syntax_error(error) from None
    return tree


def _syntax_error(error: CELParseError) -> ConditionError:
    cause = error.__cause__ or error.__context__
    if isinstance(cause, UnexpectedToken):
        if cause.token.type == "$END":
            return ConditionError("syntax error: the condition ends too early")
        return ConditionError(
            f"syntax error: unexpected {cause.token.value!r}",
            line=cause.line,
            column=cause.column,
        )
    if isinstance(cause, UnexpectedCharacters):
        return ConditionError(
            f"syntax error: unexpected character {cause.char!r}",
            line=cause.line,
            column=cause.column,
        )
    return ConditionError(
        f"syntax error: {str(error).strip()}", line=error.line, column=error.column
    )


@dataclass(frozen=True, eq=False)
class CompiledCondition:
    """A checked condition, ready to evaluate on one profile or on a whole population."""

    text: str
    """The condition as written."""
    checked_text: str
    """The condition as checked, with every implicit conversion spelled out (plain CEL)."""
    fields_read: tuple[str, ...]
    """Fields and map keys the condition reads, e.g. ``spend_90d``, ``category_affinity["x"]``."""
    literals: tuple[str, ...]
    """String literals and map keys it names (screened for sensitive terms)."""
    _closure: Closure = field(repr=False)
    _batch: Batch = field(repr=False)
    _getters: tuple[tuple[str, Getter], ...] = field(repr=False)

    def evaluate(self, profile: Mapping[str, Any]) -> bool:
        """Whether the condition holds for one profile (a :func:`profile.profile_dict`)."""
        try:
            return bool(self._closure(profile))
        except ArithmeticError:
            return False

    def evaluate_batch(self, columns: ProfileColumns) -> npt.NDArray[np.bool_]:
        """Whether the condition holds, for every row of ``columns`` at once."""
        with np.errstate(all="ignore"):
            values, errors = self._batch(columns)
            result = np.asarray(values, dtype=bool)
            if errors is not None:
                result = result & ~errors
        return np.broadcast_to(result, (columns.size,)).copy()

    def read_values(self, profile: Mapping[str, Any]) -> dict[str, FieldValue]:
        """The values of the fields the condition reads, keyed as in ``fields_read``."""
        return {name: getter(profile) for name, getter in self._getters}

    def interpret(self, profile: Mapping[str, Any]) -> bool:
        """The same answer from cel-python's interpreter (slow; the reference for tests)."""
        runner = _runner(self.checked_text)
        try:
            result = runner.evaluate({PROFILE_VARIABLE: _cel_profile(profile)})
        except CELEvalError:
            return False
        if not isinstance(result, celtypes.BoolType):
            raise TypeError(f"{self.text!r} gave {result!r}, not a bool")
        return bool(result)


@functools.lru_cache(maxsize=256)
def _runner(checked_text: str) -> celpy.Runner:
    with _PARSER_LOCK:
        environment = _environment()
        return environment.program(environment.compile(checked_text), functions=_CEL_FUNCTIONS)


@functools.lru_cache(maxsize=1024)
def compile_condition(text: str) -> CompiledCondition:
    """Parses, checks and compiles a condition over the profile ``p``.

    Raises :class:`ConditionError` naming the first construct that is unsupported, unknown or
    ill-typed.
    """
    if not text.strip():
        raise ConditionError("the condition is empty")
    if len(text) > MAX_CONDITION_LENGTH:
        raise ConditionError(f"the condition is longer than {MAX_CONDITION_LENGTH} characters")
    tree = _parse(text)
    compiler = _Compiler()
    try:
        root = compiler.value(compiler.visit(tree), tree)
    except RecursionError:
        raise ConditionError("the condition is nested too deeply") from None
    if root.type is not CelType.BOOL:
        raise ConditionError(f"the condition must be a bool, not {root.type.value}")
    return CompiledCondition(
        text=text,
        checked_text=root.cel,
        fields_read=tuple(compiler.reads),
        literals=tuple(dict.fromkeys(compiler.literals)),
        _closure=root.closure,
        _batch=root.batch,
        _getters=tuple(compiler.reads.items()),
    )
