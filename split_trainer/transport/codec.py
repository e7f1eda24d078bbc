"""The wire format of the networked transport (issue 36: the gRPC transport that uses it is in
progress): every message between the central and an edge as msgpack, a format of data only, so
that decoding a message never runs code (torch RPC pickles its calls, and unpickling runs code:
docs/wire-format.md). Decoding rebuilds values of a closed set of types: plain values, tuples,
tensors of the allowlisted dtypes, and the enums and records of transport.schema's fixed registry,
a record by calling its registered class with exactly its declared fields. A call is checked
against its method's declared shapes (``SCHEMAS``), an answer against its method's reply; every
refusal is a ``WireError`` of one line, and nothing else leaves ``decode``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import msgpack
import torch

from split_trainer.config import Config, config_from_dict
from split_trainer.core.errors import short
from split_trainer.model.models import check_named
from split_trainer.transport.schema import (DTYPE_NAMES, DTYPES, ENUM_NAMES, ENUMS, ITEMSIZE, MAX_DIMS, RECORD_NAMES,
                                            RECORDS, SCHEMAS, Bytes, Count, Leaf, Maybe, Number, Plain, Refused, Shape,
                                            Str, WireError, check_answer, check_call, checked, dtype_name, each, int64)

VERSION = 1
ERROR_CHARS = 1000  # an answer's error is one line: core.errors.short gives 300
TUPLE, TENSOR, ENUM, RECORD = 1, 2, 3, 4
"""Tags: a tagged value is a msgpack array whose first item is an empty ext of the tag's code. An
ext appears nowhere else, so a plain list (an array without one) never passes for a tagged value."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; msgpack's own limits are set from it, so no declared length can
    make it allocate more than the message's size."""
    max_bytes: int = 256 << 20
    """The largest message: the largest state a model sends (a whole edge's checkpoint part)."""
    max_depth: int = 32
    """Containers within containers (a checkpoint part nests about 8 deep)."""
    max_elements: int = 1_000_000
    """Items of every array and map of a message together: bounds the objects a decode makes."""


LIMITS = Limits()


# -- the messages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    kind: ClassVar[str] = "call"
    id: int
    method: str
    args: tuple
    timeout_s: float
    seq: Optional[int] = None


@dataclass(frozen=True)
class Answer:
    kind: ClassVar[str] = "answer"
    id: int
    result: Any = None
    error: Optional[str] = None
    """The call failed: its one line (``failed``), and ``result`` is None."""

    @classmethod
    def failed(cls, id: int, exc: BaseException) -> "Answer":
        return cls(id, None, short(exc))


@dataclass(frozen=True)
class Hello:
    kind: ClassVar[str] = "hello"
    name: str


@dataclass(frozen=True)
class Heartbeat:
    kind: ClassVar[str] = "heartbeat"
    time: float


@dataclass(frozen=True)
class Connect:
    """The central's config, from which the edge builds its edge object (Host.build)."""
    kind: ClassVar[str] = "connect"
    edge: str
    config: Config


@dataclass(frozen=True)
class Relay:
    """Edge to edge through the central (privacy.edge_weights: edges). Up, from the edge that
    asks: "send me ``peer``'s replica". Down, to that peer: "seal your replica for ``peer``" (the
    one that asked). ``nonce`` is the asker's, bound into the seal: an old blob does not open again."""
    kind: ClassVar[str] = "relay"
    id: int
    peer: str
    nonce: bytes


@dataclass(frozen=True)
class Sealed:
    """The reply to a ``Relay``: the replica sealed with the edges' key (transport.sealing),
    which the central passes on and cannot open; or the one line why there is none."""
    kind: ClassVar[str] = "sealed"
    id: int
    blob: bytes = b""
    error: Optional[str] = None


Message = Union[Call, Answer, Hello, Heartbeat, Connect, Relay, Sealed]
KINDS: dict[str, type] = {cls.kind: cls for cls in (Call, Answer, Hello, Heartbeat, Connect, Relay, Sealed)}
NONCE_BYTES = 16
_Line = Leaf("one line of text", "str", lambda v: type(v) is str and "\n" not in v and "\r" not in v
              and len(v) <= ERROR_CHARS)
_Time = Leaf("a finite number", "float", lambda v: Number.ok(v) and math.isfinite(v))
_Timeout = Leaf("a positive number of seconds", "float", lambda v: _Time.ok(v) and v > 0)
_FIELDS: dict[str, dict[str, Optional[Shape]]] = {  # each message's own fields (None: checked elsewhere)
    "call": {"id": Count, "method": Str, "args": None, "timeout_s": _Timeout, "seq": Maybe(Count)},
    "answer": {"id": Count, "result": None, "error": Maybe(_Line)},
    "hello": {"name": Leaf("an edge name", "str", lambda v: _Line.ok(v) and 0 < len(v) <= 200)},
    "heartbeat": {"time": _Time},
    "connect": {"edge": _Line, "config": Plain},
    "relay": {"id": Count, "peer": Leaf("an edge name", "str", lambda v: _Line.ok(v) and 0 < len(v) <= 200),
              "nonce": Leaf(f"{NONCE_BYTES} bytes", "bytes", lambda v: type(v) is bytes and len(v) == NONCE_BYTES)},
    "sealed": {"id": Count, "blob": Bytes, "error": Maybe(_Line)},
}


# -- encoding ----------------------------------------------------------------------------------------
_TAGS = {code: msgpack.ExtType(code, b"") for code in (TUPLE, TENSOR, ENUM, RECORD)}


def encode(message: Message, limits: Limits = LIMITS) -> bytes:
    """``message`` as bytes. A call is checked against its schema first, so that a sender's mistake
    is refused where it is made, not on the far side."""
    kind = getattr(type(message), "kind", None)
    if KINDS.get(kind) is not type(message):
        raise WireError(f"cannot send a {type(message).__name__}: not a message")
    if kind == "call":
        check_call(message)
    values = {name: getattr(message, name) for name in _FIELDS[kind]}
    if kind == "connect":  # as a config file says it: config_from_dict validates it on arrival
        if not isinstance(message.config, Config):
            raise WireError(f"connect config must be a Config, got {type(message.config).__name__}")
        values["config"] = message.config.to_dict()
    tree: dict[str, Any] = {"v": VERSION, "kind": kind}
    for name, shape in _FIELDS[kind].items():
        label = f"{kind} {name}"
        if shape is not None:
            checked(shape, values[name], label)
        if name == "args":  # always a tuple: an array without a tag
            tree[name] = [_packed(v, limits, f"{message.method}: argument {i}") for i, v in enumerate(values[name], 1)]
        else:
            tree[name] = _packed(values[name], limits, label)
    try:
        data = msgpack.packb(tree, use_bin_type=True)
    except Exception as exc:  # a string that is not UTF-8, say
        raise WireError(f"{kind} cannot be encoded ({type(exc).__name__}: {short(exc)})") from None
    if len(data) > limits.max_bytes:
        raise WireError(f"{kind} of {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    return data


def _packed(value: Any, limits: Limits, label: str) -> Any:
    try:
        return _pack(value, limits.max_depth)
    except Refused as exc:
        raise exc.at(label) from None


def _pack(value: Any, depth: int) -> Any:
    """``value`` as msgpack's own types, tagged where msgpack has none."""
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return value
    if kind is int:
        if not int64(value):
            raise Refused(f"integer {value} is outside 64 bits")
        return value
    if depth <= 0:
        raise Refused("nested too deep")
    if isinstance(value, torch.Tensor):
        return _pack_tensor(value)
    if kind in (list, tuple):
        items = [_pack(v, depth - 1) for v in value]
        return [_TAGS[TUPLE], *items] if kind is tuple else items
    if isinstance(value, dict):  # an OrderedDict (a module's state_dict) travels as a dict
        if any(type(k) is not str and not int64(k) for k in value):
            raise Refused("a dict key that is neither a string nor a 64-bit integer")
        return {k: _pack(v, depth - 1) for k, v in value.items()}
    if kind in ENUM_NAMES:
        return [_TAGS[ENUM], ENUM_NAMES[kind], value.value]
    if kind in RECORD_NAMES:
        name = RECORD_NAMES[kind]
        return [_TAGS[RECORD], name, {f: _pack(getattr(value, f), depth - 1) for f in RECORDS[name].fields}]
    raise Refused(f"cannot send a {kind.__name__}: not a wire type")


def _pack_tensor(t: torch.Tensor) -> list:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None or t.layout is not torch.strided or t.dim() > MAX_DIMS:
        raise Refused(f"cannot send a {dtype_name(t)} {t.layout} tensor of {t.dim()} dims: the wire takes "
                       f"{', '.join(DTYPES)}, strided, at most {MAX_DIMS} dims")
    t = t.detach().to("cpu").contiguous()  # a tensor that requires grad is sent detached
    return [_TAGS[TENSOR], name, list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()]


# -- decoding ----------------------------------------------------------------------------------------
def decode(data: bytes, limits: Limits = LIMITS, *, method: Optional[str] = None,
           trusted_model: Optional[str] = None) -> Message:
    """The message in ``data``, or WireError. A call is checked against ``SCHEMAS``; an answer's
    result against the reply of ``method``, the call it answers, when given (an answer does not
    name its method: ``decode_answer``). ``trusted_model``: the import path (model.name) the
    receiving host's own config names; a connect message naming another is refused, since building
    it would import and run that code."""
    raw = _parse(data, limits)
    if type(raw) is not dict:
        raise WireError(f"message of {len(data)} bytes is a {type(raw).__name__}, not a message")
    kind, version = raw.get("kind"), raw.get("v")
    if not (type(version) is int and version == VERSION):
        raise WireError(f"message of wire format version {short(repr(version))[:40]}; this side reads {VERSION}")
    if type(kind) is not str or kind not in _FIELDS:
        raise WireError(f"unknown message kind {short(repr(kind))[:60]}")
    want = {"v", "kind", *_FIELDS[kind]}
    if set(raw) != want:
        raise WireError(f"{kind} message has fields {sorted(map(str, raw))}, expected {sorted(want)}")
    fields = {}
    for name, shape in _FIELDS[kind].items():
        label = f"{method}: reply" if name == "result" and method else f"{kind} {name}"
        fields[name] = raw[name] if name == "args" else _value(raw[name], limits.max_depth, label)
        if shape is not None:
            checked(shape, fields[name], label)
    if kind == "call":
        return _call(fields, limits)
    if kind == "answer" and fields["error"] is not None and fields["result"] is not None:
        raise WireError("answer carries both an error and a result")
    if kind == "connect":
        fields["config"] = _config(fields["config"], trusted_model)
    message = KINDS[kind](**fields)
    if kind == "answer" and method is not None:
        check_answer(message, method)
    return message


def decode_call(data: bytes, limits: Limits = LIMITS) -> Call:
    message = decode(data, limits)
    if not isinstance(message, Call):
        raise WireError(f"expected a call, got a {message.kind} message")
    return message


def decode_answer(data: bytes, method: str, limits: Limits = LIMITS) -> Answer:
    """The answer in ``data`` to a call of ``method``, its result checked against the method's reply."""
    message = decode(data, limits, method=method)
    if not isinstance(message, Answer):
        raise WireError(f"expected the answer to {method}, got a {message.kind} message")
    return message


def _call(fields: dict[str, Any], limits: Limits) -> Call:
    method, args = fields["method"], fields["args"]
    if method not in SCHEMAS:
        raise WireError(f"unknown call {short(repr(method))[:80]}")
    if type(args) is not list:
        raise WireError(f"{method}: arguments must be an array, got {type(args).__name__}")
    names = [name for name, _ in SCHEMAS[method].args]
    if len(args) != len(names):
        raise WireError(f"{method}: {len(args)} arguments, expected {len(names)} ({', '.join(names) or 'none'})")
    values = tuple(_value(a, limits.max_depth, f"{method}: argument {i} ({name})")
                   for i, (a, name) in enumerate(zip(args, names), 1))
    call = Call(fields["id"], method, values, float(fields["timeout_s"]), fields["seq"])
    check_call(call)
    return call


def _config(raw: dict, trusted_model: Optional[str]) -> Config:
    """The central's config, validated as a config file is: a bad one is refused with its own line."""
    try:
        config = config_from_dict(raw)
        check_named(config.model.name, trusted_model, "the central's config")
        return config
    except Exception as exc:
        raise WireError(f"connect: the central's config is refused: {short(exc)}") from None


class _Tag:
    def __init__(self, code: int):
        self.code = code


_TAG_OF = {code: _Tag(code) for code in (TUPLE, TENSOR, ENUM, RECORD)}


def _parse(data: bytes, limits: Limits) -> Any:
    """msgpack's reading of ``data`` under ``limits``: maps' keys strings or integers, each once;
    exts only the tags, empty."""
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"a message must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise WireError(f"message of {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    seen = [0]

    def count(items: list) -> list:  # each array as msgpack completes it: the objects made so far
        seen[0] += len(items)
        if seen[0] > limits.max_elements:
            raise Refused(f"more than {limits.max_elements} elements")
        return items

    def pairs(items: list) -> dict:
        count(items)
        if any(type(k) is not str and not int64(k) for k, _ in items):
            raise Refused("a map key that is neither a string nor a 64-bit integer")
        out = dict(items)
        if len(out) != len(items):
            raise Refused("a map key given twice")
        return out

    def tag(code: int, payload: bytes) -> _Tag:
        if code not in _TAG_OF:
            raise Refused(f"unknown tag {code}")
        return _TAG_OF[code]

    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False, list_hook=count, object_pairs_hook=pairs,
                               ext_hook=tag, max_str_len=limits.max_bytes, max_bin_len=limits.max_bytes,
                               max_array_len=limits.max_elements, max_map_len=limits.max_elements, max_ext_len=0)
    except Refused as exc:
        raise WireError(f"message of {len(data)} bytes does not decode ({exc.what})") from None
    except Exception as exc:  # msgpack's and Python's: truncated, not msgpack, too deep, a limit, not UTF-8...
        raise WireError(f"message of {len(data)} bytes does not decode ({_why(exc)})") from None


def _why(exc: Exception) -> str:
    if isinstance(exc, msgpack.ExtraData):
        return "extra bytes after the message"
    if isinstance(exc, msgpack.OutOfData) or "incomplete input" in str(exc):
        return "truncated"
    if isinstance(exc, (msgpack.StackError, RecursionError)):
        return "nested too deep"
    if isinstance(exc, msgpack.FormatError):
        return "not msgpack"
    if isinstance(exc, UnicodeDecodeError):
        return "a string that is not UTF-8"
    if "exceeds max_" in str(exc):  # a declared length over Limits, refused before anything is allocated
        return f"a length over the limits: {short(exc)}"
    return f"{type(exc).__name__}: {short(exc)}"


def _value(raw: Any, depth: int, label: str) -> Any:
    try:
        return _rebuild(raw, depth)
    except Refused as exc:
        raise exc.at(label) from None


def _rebuild(raw: Any, depth: int) -> Any:
    """The value msgpack's ``raw`` stands for: tags made tuples, tensors, enums and records."""
    kind = type(raw)
    if raw is None or kind in (bool, float, str, bytes):
        return raw
    if kind is int:
        if not int64(raw):
            raise Refused(f"integer {raw} is outside 64 bits")
        return raw
    if kind is _Tag:
        raise Refused("a tag out of place")
    if depth <= 0:
        raise Refused("nested too deep")
    if kind is dict:
        out: dict = {}
        each(raw.items(), lambda k, v: out.__setitem__(k, _rebuild(v, depth - 1)))
        return out
    if raw and type(raw[0]) is _Tag:
        return _tagged(raw[0].code, raw[1:], depth)
    items: list = []
    each(enumerate(raw), lambda _, v: items.append(_rebuild(v, depth - 1)))
    return items


def _tagged(code: int, items: list, depth: int) -> Any:
    if code == TUPLE:
        out: list = []
        each(enumerate(items), lambda _, v: out.append(_rebuild(v, depth - 1)))
        return tuple(out)
    if code == TENSOR:
        return _tensor(items)
    if len(items) != 2 or type(items[0]) is not str:
        raise Refused("an enum or a record must be [name, value]")
    name, body = items
    if code == ENUM:
        if name not in ENUMS or type(body) not in (str, int):
            raise Refused(f"unknown enum {short(repr(name))[:60]}")
        try:
            return ENUMS[name](body)
        except ValueError:
            raise Refused(f"{short(repr(body))[:60]} is no {name}") from None
    record = RECORDS.get(name)  # the registry is the only way from a name to a class
    if record is None:
        raise Refused(f"unknown record {short(repr(name))[:60]}")
    if type(body) is not dict or set(body) != set(record.fields):
        got = sorted(map(str, body)) if type(body) is dict else type(body).__name__
        raise Refused(f"record {name} has fields {got}, expected {list(record.fields)}")
    fields: dict[str, Any] = {}
    each(body.items(), lambda f, v: fields.__setitem__(f, _rebuild(v, depth - 1)), True)
    each(fields.items(), record.check_field, True)  # before the class sees them
    try:
        return record.cls(**fields)
    except Exception as exc:
        raise Refused(f"record {name} refused its fields ({short(exc)})") from None


def _tensor(items: list) -> torch.Tensor:
    """A tensor from [dtype, shape, bytes], in writable memory of its own (a copy of the message's)."""
    if len(items) != 3:
        raise Refused("a tensor must be [dtype, shape, bytes]")
    name, shape, data = items
    if type(name) is not str or name not in DTYPES:
        raise Refused(f"tensor dtype {short(repr(name))[:40]} is not one the wire takes ({', '.join(DTYPES)})")
    if type(shape) is not list or len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
        raise Refused(f"tensor shape {short(repr(shape))[:60]} is not a list of at most {MAX_DIMS} sizes")
    need = math.prod(shape) * ITEMSIZE[name]
    if type(data) is not bytes or len(data) != need:
        got = len(data) if type(data) is bytes else f"a {type(data).__name__}"
        raise Refused(f"tensor of shape {shape} {name} needs {need} bytes, got {got}")
    dtype = DTYPES[name]
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    if dtype is torch.bool and bool((flat.view(torch.uint8) > 1).any()):
        raise Refused("a bool tensor holds a byte that is neither 0 nor 1")
    return flat.reshape(shape)
