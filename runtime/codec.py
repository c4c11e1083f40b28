"""The typed msgpack codec under protocol.py: frozen dataclasses <-> msgpack maps, checked on the way in.

A field's type says how it travels and what decode accepts: int, float (an int is one), str, bool,
None via `X | None`, Literal choices, list[X], tuple[X, ...], dict[str, X], a fixed tuple[A, B]
(a positional array, decoded as a checked list so it equals the list a producer built), a nested
dataclass (a map), Annotated[int | float, Range(lo, hi)] for bounds, Annotated[str, re.Pattern] for a format, and
Annotated[Sequence[int], PACKED] for token ids, which travel as one bin of little-endian uint32 and
decode as TokenIds with one copy (the fast path: no Python int per id). Decoders and encoders are
built once per class from its resolved type hints and cached. Unknown fields are dropped (the
protocol's evolution rule), except in a class with a STRICT_CODE, which refuses them with that code.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from hmoe.runtime.errors import HmoeError

MAX_LIST_LEN = 1 << 20

Check = Callable[[Any], Any]  # a wire value -> the field's value, or ProtocolError
Pack = Callable[[Any], Any]  # a field's value -> what msgpack packs


class ProtocolError(HmoeError):
    """A frame that is not a valid message: the receiver replies with this code and keeps serving."""

    request_id: str | None = None  # the frame's request_id when it had a valid one (for the error reply)


class Range(NamedTuple):
    """Inclusive bounds of an int or float field: Annotated[int, Range(0)]."""

    lo: float = -float("inf")
    hi: float = float("inf")


class _Packed:
    """Marks a field of token ids: packed on the wire, decoded as TokenIds."""


PACKED = _Packed()

if TYPE_CHECKING:
    _IdArray = array.array[int]
else:
    _IdArray = array.array


class TokenIds(_IdArray):
    """Token ids as messages carry them: uint32, packed on the wire. Compares equal to a list or a
    tuple of the same ids, so code and tests may build messages from lists."""

    def __new__(cls, ids: Iterable[int] = ()) -> TokenIds:
        return typing.cast(TokenIds, super().__new__(cls, "I", ids))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and self.tolist() == list(other)
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return f"TokenIds({self.tolist()!r})"


assert TokenIds().itemsize == 4


def chain_keys(token_ids: Sequence[int], span: int, count: int, root: bytes = b"") -> list[bytes]:
    """The keys of the first `count` spans of `span` token ids, each naming all the ids up to its span's
    end: key(i) = blake2b(key(i - 1) + span i as uint32), key(-1) = root. The prefill worker's prefix
    cache keys its KV blocks so; the router keys which worker prefilled what the same way."""
    ids = token_ids if isinstance(token_ids, TokenIds) else TokenIds(token_ids[: count * span])
    key, keys = root, []
    for start in range(0, count * span, span):
        key = hashlib.blake2b(key + ids[start : start + span].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


def pack_token_ids(ids: Sequence[int]) -> bytes:
    """Token ids -> their wire form (ProtocolError "bad_message" for anything but ints in [0, 2**32))."""
    if not isinstance(ids, TokenIds) or sys.byteorder == "big":
        try:
            ids = TokenIds(ids)
        except (OverflowError, TypeError):
            raise ProtocolError("bad_message", "token ids must be integers in [0, 2**32)") from None
        if sys.byteorder == "big":
            ids.byteswap()
    return ids.tobytes()


# -- decoding -----------------------------------------------------------------------------------------

_DECODERS: dict[type, Check] = {}
_ABSENT = object()
_ENCODERS: dict[type, Pack] = {}


def _bad(where: str, why: str) -> ProtocolError:
    return ProtocolError("bad_message", f"{where}: {why}")


def _fail(where: str, expected: str, value: Any) -> Any:
    raise _bad(where, f"must be {expected}, got {type(value).__name__}")


def record_decoder(cls: type) -> Check:
    """map -> an instance of the dataclass `cls`, every field checked; built the first time it is needed."""
    decoder = _DECODERS.get(cls)
    if decoder is not None:
        return decoder
    hints = typing.get_type_hints(cls, include_extras=True)
    name = getattr(cls, "TAG", cls.__name__)
    plan = []  # (field, check, default maker or None when required)
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            make: Callable[[], Any] | None = f.default_factory
        else:
            make = None if f.default is dataclasses.MISSING else (lambda default=f.default: default)
        plan.append((f.name, _checker(hints[f.name], f"{name}.{f.name}"), make))
    known = {f for f, _, _ in plan}
    strict: str | None = getattr(cls, "STRICT_CODE", None)
    # A slotted class without __post_init__ gets its checked fields set directly (a frozen dataclass's
    # __init__ costs as much again); one with its own checks (SamplingParams) is built through __init__.
    slots = [getattr(cls.__dict__.get(f), "__set__", None) for f, _, _ in plan]
    setters: list[Callable[[Any, Any], None]] = [s or _no_setter for s in slots]
    direct = all(slots) and "__slots__" in cls.__dict__ and not hasattr(cls, "__post_init__") and not strict
    direct_plan = [(f, check, make, setter) for (f, check, make), setter in zip(plan, setters)]

    def build_direct(value: Any) -> Any:
        if type(value) is not dict:
            return _fail(name, "a map", value)
        obj: Any = object.__new__(cls)
        get = value.get
        for field_name, check, make, setter in direct_plan:
            got = get(field_name, _ABSENT)
            if got is not _ABSENT:
                setter(obj, check(got))
            elif make is not None:
                setter(obj, make())
            else:
                raise _bad(name, f"missing field {field_name!r}")
        return obj

    def build(value: Any) -> Any:
        if type(value) is not dict:
            return _fail(name, "a map", value)
        kwargs = {}
        try:
            for field_name, check, make in plan:
                got = value.get(field_name, _ABSENT)
                if got is not _ABSENT:
                    kwargs[field_name] = check(got)
                elif make is None:
                    raise _bad(name, f"missing field {field_name!r}")
            if strict and len(kwargs) < len(value):
                raise ProtocolError(strict, f"unknown {name} fields {sorted(map(str, set(value) - known))}")
            return cls(**kwargs)
        except ProtocolError as exc:
            if strict and exc.code == "bad_message":
                raise ProtocolError(strict, exc.message) from None
            raise
        except HmoeError as exc:  # the class's own checks (SamplingParams' ranges)
            raise ProtocolError(exc.code, exc.message) from None

    decoder = build_direct if direct else build
    _DECODERS[cls] = decoder
    return decoder


def _no_setter(obj: Any, value: Any) -> None:
    raise AssertionError(f"{type(obj).__name__} has no slot for a field")


def _checker(hint: Any, where: str) -> Check:
    """The check of one field type (the common shapes fused into one call: this runs per field per message)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (option,) = [a for a in args if a is not type(None)]  # only `X | None`
        inner = _checker(option, where)
        return lambda value: None if value is None else inner(value)
    if origin is Annotated and PACKED in args[1:]:
        return lambda value: _token_ids(value, where)
    if origin is Annotated:
        (bound,) = args[1:]
        if isinstance(bound, Range) and args[0] is int:
            lo, hi = bound
            return lambda value: (
                value if type(value) is int and lo <= value <= hi else _fail(where, f"int in {bound}", value)
            )
        if isinstance(bound, Range) and args[0] is float:
            lo, hi = bound  # an int is a float; NaN is in no range
            return lambda value: (
                float(value)
                if type(value) in (float, int) and lo <= value <= hi
                else _fail(where, f"number in {bound}", value)
            )
        if isinstance(bound, re.Pattern) and args[0] is str:
            match = bound.match
            return lambda value: (
                value if type(value) is str and match(value) else _fail(where, f"str matching {bound.pattern}", value)
            )
        raise TypeError(f"codec: unknown bound {bound!r} on {where}")
    if origin is Literal:
        return lambda value: value if type(value) is str and value in args else _fail(where, f"one of {args}", value)
    if origin is tuple and args[1:] != (...,):  # positional: [a, b] on the wire, decoded as a checked list
        items = [_checker(a, f"{where}[{i}]") for i, a in enumerate(args)]
        return lambda value: (
            [check(v) for check, v in zip(items, value)]
            if type(value) is list and len(value) == len(items)
            else _fail(where, f"a list of {len(items)}", value)
        )
    if origin in (list, tuple):
        assert origin is list or args[1:] == (...,), hint
        item, kind = _checker(args[0], f"{where}[]"), origin
        return lambda value: (
            kind(map(item, value))
            if type(value) is list and len(value) <= MAX_LIST_LEN
            else _fail(where, "a list", value)
        )
    if origin is dict:
        assert args[0] is str, hint
        item = _checker(args[1], f"{where}{{}}")
        return lambda value: (
            {(k if type(k) is str else _fail(where, "str keys", k)): item(v) for k, v in value.items()}
            if type(value) is dict
            else _fail(where, "a map", value)
        )
    if dataclasses.is_dataclass(hint):
        return record_decoder(typing.cast(type, hint))
    if hint is float:  # an int is a float; a bool is neither
        return lambda value: float(value) if type(value) in (float, int) else _fail(where, "a number", value)
    if hint in (int, str, bool):
        return lambda value: value if type(value) is hint else _fail(where, hint.__name__, value)
    raise TypeError(f"codec: {where} has a type the codec does not carry: {hint!r}")


def _token_ids(value: Any, where: str) -> TokenIds:
    """The fast path: packed uint32 bytes (one copy); or, slower, a msgpack array of ints."""
    ids = TokenIds()
    if type(value) is bytes:
        if len(value) % 4 or len(value) > 4 * MAX_LIST_LEN:
            raise _bad(where, "packed token ids must be a multiple of 4 bytes")
        ids.frombytes(value)
        if sys.byteorder == "big":
            ids.byteswap()
        return ids
    if type(value) is list and len(value) <= MAX_LIST_LEN and all(type(t) is int for t in value):
        try:
            ids.extend(value)
        except OverflowError:
            raise _bad(where, "token ids must be in [0, 2**32)") from None
        return ids
    return _fail(where, "token ids (packed uint32 bytes or a list of ints)", value)


# -- encoding -----------------------------------------------------------------------------------------


def record_encoder(cls: type) -> Pack:
    """An instance of the dataclass `cls` -> a dict msgpack packs; built the first time it is needed."""
    encoder = _ENCODERS.get(cls)
    if encoder is not None:
        return encoder
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, _packer(hints[f.name])) for f in dataclasses.fields(cls)]

    def pack(obj: Any) -> dict:
        return {name: getattr(obj, name) if p is None else p(getattr(obj, name)) for name, p in fields}

    _ENCODERS[cls] = pack
    return pack


def _packer(hint: Any) -> Pack | None:
    """How a field's value becomes msgpack (None: as it is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated and PACKED in args[1:]:
        return pack_token_ids
    if origin is Annotated:
        return _packer(args[0])
    if origin is tuple and args[1:] != (...,):
        packers = [_packer(a) for a in args]
        if not any(packers):
            return None
        return lambda value: [v if p is None else p(v) for p, v in zip(packers, value)]
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        item = [a for a in args if a is not type(None)][-1]  # X | None, list[X], tuple[X, ...], dict[str, X]
        inner = _packer(item if item is not ... else args[0])
        if inner is None:
            return None
        if origin is dict:
            return lambda value: {k: inner(v) for k, v in value.items()}
        if origin in (list, tuple):
            return lambda value: [inner(v) for v in value]
        return lambda value: None if value is None else inner(value)
    if dataclasses.is_dataclass(hint):
        return record_encoder(typing.cast(type, hint))
    return None
