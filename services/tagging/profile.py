"""The profile fields tag rules may read, and the two shapes a population of profiles takes.

The catalogue is read from ``steward.tagging.v1.Profile``'s descriptor, so a rule can read exactly
what GetProfile shows a person, no more, and the two cannot drift apart. Every field except
``person_id`` is readable as ``p.<field>``.

Maps are sparse: a key that is absent and a key whose value is 0 mean the same thing (no
activity), so an absent key reads as 0, and neither ``"key" in p.map`` nor ``size(p.map)`` counts
keys whose value is 0. The single-profile shape is a plain ``dict`` (see :func:`profile_dict`);
the population shape is :class:`ProfileColumns`, one numpy array per field (or map key) read.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from steward.common.v1 import common_pb2
from steward.tagging.v1 import tagging_pb2


class CelType(enum.Enum):
    """The CEL types a condition deals in."""

    INT = "int"
    DOUBLE = "double"
    STRING = "string"
    BOOL = "bool"
    MAP_INT = "map<string, int>"
    MAP_DOUBLE = "map<string, double>"

    @property
    def is_map(self) -> bool:
        return self in (CelType.MAP_INT, CelType.MAP_DOUBLE)

    @property
    def is_number(self) -> bool:
        return self in (CelType.INT, CelType.DOUBLE)

    @property
    def value_type(self) -> CelType:
        """The type of a map's values (a scalar type is its own value type)."""
        if self is CelType.MAP_INT:
            return CelType.INT
        if self is CelType.MAP_DOUBLE:
            return CelType.DOUBLE
        return self


FieldValue: TypeAlias = int | float | str | dict[str, int] | dict[str, float]
"""A profile field's value: a number, a string or a sparse map of numbers."""

ProfileDict: TypeAlias = dict[str, FieldValue]

_INTEGER_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_DOUBLE_TYPES: Final = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
_NOT_READABLE: Final = frozenset({"person_id"})


def _scalar_type(field: FieldDescriptor) -> CelType:
    if field.type in _INTEGER_TYPES:
        return CelType.INT
    if field.type in _DOUBLE_TYPES:
        return CelType.DOUBLE
    if field.type == FieldDescriptor.TYPE_STRING:
        return CelType.STRING
    raise TypeError(f"Profile.{field.name}: no CEL mapping for protobuf type {field.type}")


def _field_type(field: FieldDescriptor) -> CelType:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if key.type != FieldDescriptor.TYPE_STRING:
            raise TypeError(f"Profile.{field.name}: only string-keyed maps are supported")
        value_type = _scalar_type(value)
        if value_type is CelType.INT:
            return CelType.MAP_INT
        if value_type is CelType.DOUBLE:
            return CelType.MAP_DOUBLE
        raise TypeError(f"Profile.{field.name}: only maps of numbers are supported")
    if field.is_repeated:
        raise TypeError(f"Profile.{field.name}: repeated fields are not supported")
    return _scalar_type(field)


def _catalogue(descriptor: Descriptor) -> dict[str, CelType]:
    return {
        field.name: _field_type(field)
        for field in descriptor.fields
        if field.name not in _NOT_READABLE
    }


PROFILE_FIELDS: Final[Mapping[str, CelType]] = _catalogue(tagging_pb2.Profile.DESCRIPTOR)
"""Field name to CEL type, in proto order: everything a rule can read as ``p.<field>``."""

EVENT_TYPE_KEYS: Final[tuple[str, ...]] = tuple(
    name.removeprefix("EVENT_TYPE_").lower()
    for name, number in common_pb2.EventType.items()
    if number != 0
)
"""Keys of the ``type_counts_*`` maps: the event types, e.g. ``add_to_cart``."""

KNOWN_MAP_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    name: EVENT_TYPE_KEYS for name in PROFILE_FIELDS if name.startswith("type_counts_")
}
"""Maps whose keys form a closed set; the other maps (categories, channels) are open."""


def default_value(cel_type: CelType) -> FieldValue:
    """The value a field has when the profile does not carry it (proto3 defaults)."""
    if cel_type is CelType.INT:
        return 0
    if cel_type is CelType.DOUBLE:
        return 0.0
    if cel_type is CelType.STRING:
        return ""
    return {}


def _map_value(value: Any, cel_type: CelType) -> dict[str, int] | dict[str, float]:
    items = value.items() if isinstance(value, Mapping) else dict(value).items()
    if cel_type is CelType.MAP_INT:
        return {str(k): int(v) for k, v in items if v}
    return {str(k): float(v) for k, v in items if v}


def profile_dict(profile: Mapping[str, Any] | tagging_pb2.Profile) -> ProfileDict:
    """A profile as the single-person evaluation path reads it.

    Every catalogue field is present with its catalogue type (ints as ``int``, doubles as
    ``float``), missing ones take their proto default, and map entries equal to 0 are dropped.
    Accepts a ``Profile`` message or any mapping (e.g. a row); unknown keys are ignored.
    """
    if isinstance(profile, tagging_pb2.Profile):
        source: Mapping[str, Any] = {name: getattr(profile, name) for name in PROFILE_FIELDS}
    else:
        source = profile
    result: ProfileDict = {}
    for name, cel_type in PROFILE_FIELDS.items():
        value = source.get(name)
        if value is None:
            result[name] = default_value(cel_type)
        elif cel_type is CelType.INT:
            result[name] = int(value)
        elif cel_type is CelType.DOUBLE:
            result[name] = float(value)
        elif cel_type is CelType.STRING:
            result[name] = str(value)
        else:
            result[name] = _map_value(value, cel_type)
    return result


def _dtype(cel_type: CelType) -> npt.DTypeLike:
    if cel_type.value_type is CelType.INT:
        return np.int64
    if cel_type.value_type is CelType.DOUBLE:
        return np.float64
    return object


@dataclass(frozen=True, slots=True)
class _EmptyMap:
    """Stands in for a missing map so lookups need no branch."""

    def get(self, key: str, default: Any = None) -> Any:
        return default

    def values(self) -> tuple[()]:
        return ()


EMPTY_MAP: Final = _EmptyMap()


class ProfileColumns:
    """A population of profiles as numpy columns, for evaluating every rule on everyone at once.

    Columns are built on first use and kept, so only the fields and map keys the rules read are
    ever materialised. Row ``i`` is the ``i``-th profile given; ``person_ids`` follows the same
    order when the profiles carry a ``person_id``.
    """

    def __init__(
        self,
        size: int,
        *,
        profiles: Sequence[Mapping[str, Any]] | None = None,
        scalars: Mapping[str, npt.ArrayLike] | None = None,
        maps: Mapping[str, Mapping[str, npt.ArrayLike]] | None = None,
        person_ids: Sequence[str] | None = None,
    ) -> None:
        self.size = size
        self.person_ids: tuple[str, ...] | None = tuple(person_ids) if person_ids else None
        self._profiles = profiles
        self._scalars: dict[str, npt.NDArray[Any]] = {}
        self._map_values: dict[tuple[str, str], npt.NDArray[Any]] = {}
        self._map_sizes: dict[str, npt.NDArray[np.int64]] = {}
        self._map_rows: dict[str, list[Any]] = {}
        self._complete_maps: set[str] = set()
        for name, column in (scalars or {}).items():
            self._scalars[name] = self._checked(name, column, PROFILE_FIELDS[name])
        for name, keyed in (maps or {}).items():
            for key, column in keyed.items():
                self._map_values[(name, key)] = self._checked(name, column, PROFILE_FIELDS[name])
            self._complete_maps.add(name)

    @classmethod
    def from_profiles(cls, profiles: Sequence[Mapping[str, Any]]) -> ProfileColumns:
        """Columns over dict-like profiles (e.g. :func:`profile_dict` results or rows)."""
        ids = [p["person_id"] for p in profiles if isinstance(p.get("person_id"), str)]
        complete = len(ids) == len(profiles)
        return cls(len(profiles), profiles=profiles, person_ids=ids if complete else None)

    @classmethod
    def from_arrays(
        cls,
        size: int,
        scalars: Mapping[str, npt.ArrayLike],
        maps: Mapping[str, Mapping[str, npt.ArrayLike]],
        person_ids: Sequence[str] | None = None,
    ) -> ProfileColumns:
        """Columns given directly (e.g. read from a columnar store).

        A map given here must list every key it has in the population, so that ``size()`` and
        keys absent from it (read as 0) are right; a field not given at all reads as its default.
        """
        return cls(size, scalars=scalars, maps=maps, person_ids=person_ids)

    def __len__(self) -> int:
        return self.size

    def _checked(self, name: str, column: npt.ArrayLike, cel_type: CelType) -> npt.NDArray[Any]:
        array = np.asarray(column, dtype=_dtype(cel_type))
        if array.shape != (self.size,):
            raise ValueError(f"column {name}: shape {array.shape}, expected ({self.size},)")
        return array

    def _source(self) -> Sequence[Mapping[str, Any]]:
        return self._profiles if self._profiles is not None else ()

    def scalar(self, name: str) -> npt.NDArray[Any]:
        """The column of a scalar field (int64, float64, or object for strings)."""
        column = self._scalars.get(name)
        if column is None:
            cel_type = PROFILE_FIELDS[name]
            if cel_type.is_map:
                raise KeyError(f"{name} is a map: read one key with map_values()")
            default = default_value(cel_type)
            profiles = self._source()
            if not profiles:
                column = np.full(self.size, default, dtype=_dtype(cel_type))
            elif cel_type is CelType.STRING:
                column = np.empty(self.size, dtype=object)
                column[:] = [str(p.get(name) or "") for p in profiles]
            else:
                try:  # profiles as stored hold every field, never None
                    column = np.fromiter(
                        map(operator.methodcaller("get", name, default), profiles),
                        dtype=_dtype(cel_type),
                        count=self.size,
                    )
                except TypeError:
                    column = np.fromiter(
                        (p.get(name) or default for p in profiles),
                        dtype=_dtype(cel_type),
                        count=self.size,
                    )
            self._scalars[name] = column
        return column

    def map_values(self, name: str, key: str) -> npt.NDArray[Any]:
        """One key of a map field across the population, 0 where a profile lacks it."""
        column = self._map_values.get((name, key))
        if column is None:
            cel_type = PROFILE_FIELDS[name]
            if not cel_type.is_map:
                raise KeyError(f"{name} is not a map")
            profiles = self._source()
            if not profiles:
                column = np.zeros(self.size, dtype=_dtype(cel_type))
            else:
                column = np.fromiter(
                    map(operator.methodcaller("get", key, 0), self._maps(name, profiles)),
                    dtype=_dtype(cel_type),
                    count=self.size,
                )
            self._map_values[(name, key)] = column
        return column

    def _maps(self, name: str, profiles: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Each profile's map ``name`` (an empty one where it has none), looked up once for
        all the keys read from it."""
        rows = self._map_rows.get(name)
        if rows is None:
            rows = self._map_rows[name] = [p.get(name) or EMPTY_MAP for p in profiles]
        return rows

    def map_sizes(self, name: str) -> npt.NDArray[np.int64]:
        """How many keys of a map field are non-zero, per profile (CEL ``size(p.map)``)."""
        sizes = self._map_sizes.get(name)
        if sizes is None:
            if not PROFILE_FIELDS[name].is_map:
                raise KeyError(f"{name} is not a map")
            profiles = self._source()
            if name in self._complete_maps or not profiles:
                sizes = np.zeros(self.size, dtype=np.int64)
                for (field, _key), column in self._map_values.items():
                    if field == name:
                        sizes += column != 0
            else:
                sizes = np.fromiter(
                    (_nonzero((p.get(name) or EMPTY_MAP).values()) for p in profiles),
                    dtype=np.int64,
                    count=self.size,
                )
            self._map_sizes[name] = sizes
        return sizes


def _nonzero(values: Collection[Any]) -> int:
    return len(values) - operator.countOf(values, 0)
