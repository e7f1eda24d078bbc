"""What each call between the central and an edge carries, declared as data: the shapes of every
call's arguments and reply (``SCHEMAS``), the only enums and records a message can rebuild
(``RECORDS``, ``ENUMS``, each record's fields with their shapes) and the tensor dtypes the wire
takes (``DTYPES``). The wire format itself (transport.codec) checks every message against them;
docs/wire-format.md's table is ``table()``'s. Nothing here reads bytes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional

import torch

from split_trainer.core.errors import JobError, short
from split_trainer.core.hops import Hop, HopKind
from split_trainer.data.shards import ShardBatch
from split_trainer.data.vertical import Aligned
from split_trainer.transport.admission import Proof, Verdict
from split_trainer.transport.wire import Packed, Reply

if TYPE_CHECKING:
    from split_trainer.transport.codec import Answer, Call

INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_DIMS = 8
DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "int8", "uint8", "int32", "int64", "bool")}
"""The tensor dtypes the wire takes, by the name it writes."""
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


class WireError(JobError):
    """A message refused (or one that cannot be sent), said in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split())[:400])


class Refused(Exception):
    """A refusal deep in a value (the wire modules' own): each container on the way up adds its
    place to ``path``, and ``at`` makes it the one line of a WireError."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what, self.path = what, []

    def at(self, label: str) -> WireError:
        where = label + "".join(reversed(self.path))
        return WireError(f"{where} {self.what}" if self.what.startswith("must") else f"{where}: {self.what}")


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype) or str(t.dtype).removeprefix("torch.")


def got(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{dtype_name(value)} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {short(repr(value))[:60]}" if isinstance(value, (int, float, str)) else \
        type(value).__name__


# -- shapes: what a call's arguments and reply must be ---------------------------------------------
class Shape:
    text = ""  # as an error says it: "must be <text>"
    sig = ""  # as docs/wire-format.md's table writes it

    def check(self, value: Any) -> None:
        if not self.ok(value):
            raise Refused(f"must be {self.text}, got {got(value)}")

    def ok(self, value: Any) -> bool:
        raise NotImplementedError


class Leaf(Shape):
    def __init__(self, text: str, sig: str, test: Any):
        self.text, self.sig, self.ok = text, sig, test


def int64(v: Any) -> bool:
    return type(v) is int and INT64[0] <= v <= INT64[1]


Nothing = Leaf("None", "None", lambda v: v is None)
Bool = Leaf("a bool", "bool", lambda v: type(v) is bool)
Int = Leaf("an integer", "int", int64)
Count = Leaf("a non-negative integer", "int>=0", lambda v: int64(v) and v >= 0)
Number = Leaf("a number", "number", lambda v: type(v) is float or int64(v))
Str = Leaf("a string", "str", lambda v: type(v) is str)
Bytes = Leaf("bytes", "bytes", lambda v: type(v) is bytes)


class Choice(Shape):
    def __init__(self, *words: str):
        self.words, self.text, self.sig = words, "one of " + ", ".join(words), "|".join(map(repr, words))

    def ok(self, value: Any) -> bool:
        return type(value) is str and value in self.words


class Tensor(Shape):
    """A tensor of one of ``kinds`` (dtype names) with ``ndim`` dimensions (None: any)."""

    def __init__(self, kinds: tuple[str, ...], ndim: Optional[int] = None, label: str = ""):
        self.kinds, self.ndim = kinds, ndim
        words = " ".join(w for w in ("" if ndim is None else f"{ndim}-d", label, "tensor") if w)
        self.text = f"{'an' if words[0] in 'i8' else 'a'} {words}"
        self.sig = f"Tensor[{label or 'any'}{'' if ndim is None else f', {ndim}-d'}]"

    def check(self, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise Refused(f"must be {self.text}, got {got(value)}")
        if DTYPE_NAMES.get(value.dtype) not in self.kinds:
            raise Refused(f"must be {self.text}, got {dtype_name(value)}")
        if self.ndim is not None and value.dim() != self.ndim:
            raise Refused(f"must be {self.text}, got {value.dim()}-d")


FLOAT, INTEGER = ("float32", "float64", "float16", "bfloat16"), ("int8", "uint8", "int32", "int64")


class Maybe(Shape):
    def __init__(self, shape: Shape):
        self.shape, self.text, self.sig = shape, f"{shape.text} or None", f"{shape.sig} | None"

    def check(self, value: Any) -> None:
        if value is not None:
            self.shape.check(value)


class Either(Shape):
    def __init__(self, *shapes: Shape):
        self.shapes = shapes
        self.text, self.sig = " or ".join(s.text for s in shapes), " | ".join(s.sig for s in shapes)

    def check(self, value: Any) -> None:
        errors = []
        for shape in self.shapes:
            try:
                return shape.check(value)
            except Refused as exc:
                errors.append(exc)
        # A record or a tensor of the right type refused deeper: its own reason says more.
        raise next((e for e in errors if e.path), Refused(f"must be {self.text}, got {got(value)}"))


def each(pairs: Any, check: Any, field: bool = False) -> None:
    """``check(key, value)`` on each pair, a refusal placed at its key (a record's ``field``)."""
    for key, value in pairs:
        try:
            check(key, value)
        except Refused as exc:
            exc.path.append(f".{key}" if field else f"[{key!r}]")
            raise


class ListOf(Shape):
    def __init__(self, item: Shape):
        self.item, self.text, self.sig = item, f"a list of {item.sig}", f"list[{item.sig}]"

    def check(self, value: Any) -> None:
        if type(value) is not list:
            raise Refused(f"must be {self.text}, got {got(value)}")
        each(enumerate(value), lambda _, v: self.item.check(v))


class TupleOf(Shape):
    def __init__(self, *items: Shape):
        self.items = items
        self.sig = f"tuple[{', '.join(s.sig for s in items)}]"
        self.text = f"a {self.sig}"

    def check(self, value: Any) -> None:
        if type(value) is not tuple or len(value) != len(self.items):
            raise Refused(f"must be {self.text}, got {got(value)}")
        each(enumerate(value), lambda i, v: self.items[i].check(v))


class DictOf(Shape):
    def __init__(self, key: Shape, value: Shape):
        self.key, self.value = key, value
        self.sig = f"dict[{key.sig}, {value.sig}]"
        self.text = f"a {self.sig}"

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise Refused(f"must be {self.text}, got {got(value)}")
        each(value.items(), lambda k, v: (self.key.check(k), self.value.check(v)))


class Keys(Shape):
    """A dict of exactly these keys (``optional``: these may be absent)."""

    def __init__(self, optional: tuple[str, ...] = (), **keys: Shape):
        self.keys, self.optional = keys, optional
        self.sig = "{" + ", ".join(f"{k}{'?' if k in optional else ''}: {s.sig}" for k, s in keys.items()) + "}"
        self.text = f"a dict {self.sig}"

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise Refused(f"must be {self.text}, got {got(value)}")
        if not set(self.keys) - set(self.optional) <= set(value) <= set(self.keys):
            raise Refused(f"must be {self.text}, got the keys {sorted(map(str, value))}")
        each(value.items(), lambda k, v: self.keys[k].check(v))


class EnumOf(Shape):
    def __init__(self, cls: type[Enum]):
        self.cls, self.text, self.sig = cls, f"a {cls.__name__}", cls.__name__

    def ok(self, value: Any) -> bool:
        return type(value) is self.cls


class Record(Shape):
    """A record of the registry (``RECORDS``), each field of its registered shape."""

    def __init__(self, cls: type):
        self.cls, self.text, self.sig = cls, f"a {cls.__name__} record", cls.__name__

    def check(self, value: Any) -> None:
        if type(value) is not self.cls:
            raise Refused(f"must be {self.text}, got {got(value)}")
        record = RECORDS[RECORD_NAMES[self.cls]]
        each(((name, getattr(value, name)) for name in record.fields), record.check_field, True)


class _Plain(Shape):
    """Plain values nested in lists and dicts (string or integer keys); ``state`` adds what a
    state_dict, an optimizer's or a checkpoint part holds: tensors, tuples, bytes. No record, no enum."""

    def __init__(self, state: bool):
        self.leaves = (bool, float, str, bytes) if state else (bool, float, str)
        self.state = state
        self.sig = "AnyState" if state else "Plain"
        self.text = "state (tensors, numbers, strings, bytes, lists, tuples, dicts)" if state else \
            "plain data (numbers, strings, lists, dicts)"

    def check(self, value: Any) -> None:
        if value is None or type(value) in self.leaves or int64(value):
            return
        if self.state and isinstance(value, torch.Tensor):
            return
        if type(value) is list or self.state and type(value) is tuple:
            return each(enumerate(value), lambda _, v: self.check(v))
        if isinstance(value, dict):
            return each(value.items(), lambda k, v: (_KEY.check(k), self.check(v)))
        raise Refused(f"must be {self.text}, got {got(value)}")


_KEY = Either(Str, Int)
AnyState, Plain = _Plain(True), _Plain(False)
State = DictOf(Str, Tensor(tuple(DTYPES)))  # a stage's state_dict (Stage.state_dict)
Part = DictOf(Str, AnyState)  # an edge's checkpoint part (Edge.export_state)
FileInfo = Keys(bytes=Int, sha256=Str)  # a checkpoint file's size and SHA-256 (records.checkpoint)
BYTES = Tensor(("uint8",), 1, "uint8")


@dataclass(frozen=True)
class RecordType:
    """A registered record: its class, and each of its fields (all of them, in order) with its shape."""
    cls: type
    fields: dict[str, Shape]

    def check_field(self, name: str, value: Any) -> None:
        self.fields[name].check(value)


# -- the registry: the only classes a message can rebuild -------------------------------------------
_split = Choice("train", "test")
RECORDS: dict[str, RecordType] = {
    "Hop": RecordType(Hop, {"kind": EnumOf(HopKind), "segment": Count, "place": Choice("edge", "central")}),
    "Reply": RecordType(Reply, {
        "output": Maybe(Either(Tensor(FLOAT, label="float"), Record(Packed))),
        "loss": Maybe(Either(Number, Tensor(FLOAT, 0, "float"))),
        "score": Maybe(TupleOf(Number, Count, Count)), "labels": Maybe(Tensor(INTEGER, 1, "integer"))}),
    "Packed": RecordType(Packed, {"values": Tensor(("int8", "float8_e4m3fn"), label="8-bit"),
                                  "scale": Tensor(("float32",), 1, "float32"),
                                  "carrier": Maybe(Tensor(FLOAT, 1, "float"))}),
    "ShardBatch": RecordType(ShardBatch, {"split": _split, "epoch": Count, "index": Count, "labels": Bool}),
    "Aligned": RecordType(Aligned, {"split": _split, "epoch": Count, "index": Count}),
    "Proof": RecordType(Proof, {"host": Str, "nonce": Bytes, "mac": Maybe(Bytes)}),
    "Verdict": RecordType(Verdict, {"kind": Choice("admitted", "refused", "stopped"), "mac": Maybe(Bytes),
                                    "reason": Str}),
}
RECORD_NAMES = {r.cls: name for name, r in RECORDS.items()}
ENUMS: dict[str, type[Enum]] = {"HopKind": HopKind}
ENUM_NAMES = {cls: name for name, cls in ENUMS.items()}


@dataclass(frozen=True)
class CallSchema:
    args: tuple[tuple[str, Shape], ...]
    reply: Shape
    numbered: bool = False
    """Training calls carry a ``seq`` (Link.submit); every other call's is None."""


_payload = Either(Tensor(FLOAT, label="float"), Record(Packed), Record(ShardBatch), Record(Aligned))
SCHEMAS: dict[str, CallSchema] = {
    "run": CallSchema((("work", ListOf(TupleOf(Record(Hop), _payload))),
                       ("labels", Maybe(Tensor(INTEGER, 1, "integer"))), ("lr", Number)), Record(Reply), True),
    "apply_step": CallSchema((("context_id", Int), ("lr", Number)), Nothing),
    "get_state": CallSchema((), State),
    "set_state": CallSchema((("state", State),), Nothing),
    "export_state": CallSchema((), Part),
    "import_state": CallSchema((("state", Part),), Nothing),
    "save_part": CallSchema((("step", Count), ("job", Str)), FileInfo),
    "load_part": CallSchema((("step", Count), ("expected", FileInfo)), Nothing),
    "peer_state": CallSchema((), State),
    "gather_average": CallSchema((("peers", ListOf(Str)),), Nothing),
    "apply_average": CallSchema((), Nothing),
    "about": CallSchema((), Keys(host=Str, threads=Int, device=Str,
                                 shard=Maybe(DictOf(Str, Either(Int, ListOf(Int)))))),
    "rss": CallSchema((), Int),
    "finish": CallSchema((), Nothing),
    "psi_answer": CallSchema((("request", BYTES), ("count", Count)), TupleOf(BYTES, BYTES)),
    "align": CallSchema((("ids", BYTES),), Nothing),
}
"""Every call the central (or a peer edge) makes of an edge: training.edge.CALLS and the calls of
every placement's edge side (data.placement.EdgeSide.calls); a test keeps the two in step."""


def checked(shape: Shape, value: Any, label: str) -> None:
    """``value`` checked against ``shape``; a refusal is a WireError placed at ``label``."""
    try:
        shape.check(value)
    except Refused as exc:
        raise exc.at(label) from None


def check_call(call: Call) -> None:
    """Refuse (WireError) a call of no known method, or whose arguments or ``seq`` do not match it."""
    schema = SCHEMAS.get(call.method) if type(call.method) is str else None
    if schema is None:
        raise WireError(f"unknown call {call.method!r}")
    if type(call.args) is not tuple:
        raise WireError(f"{call.method}: arguments must be a tuple, got {type(call.args).__name__}")
    if len(call.args) != len(schema.args):
        names = ", ".join(name for name, _ in schema.args) or "none"
        raise WireError(f"{call.method}: {len(call.args)} arguments, expected {len(schema.args)} ({names})")
    if call.seq is not None and not schema.numbered:
        raise WireError(f"{call.method}: a seq ({call.seq}) on a call that is not a training call")
    for i, ((name, shape), value) in enumerate(zip(schema.args, call.args), 1):
        checked(shape, value, f"{call.method}: argument {i} ({name})")


def check_answer(answer: Answer, method: str) -> None:
    """Refuse an answer whose result is not what ``method`` replies (an error carries none)."""
    if method not in SCHEMAS:
        raise WireError(f"unknown call {method!r}")
    if answer.error is None:
        checked(SCHEMAS[method].reply, answer.result, f"{method}: reply")
    elif answer.result is not None:
        raise WireError(f"{method}: an answer with both an error and a result")


def tables() -> tuple[str, str]:
    """docs/wire-format.md's tables, in Markdown: the calls (from ``SCHEMAS``) and the registry (from
    ``RECORDS`` and ``ENUMS``); a test keeps the page in step."""
    def code(text: str) -> str:
        return f"`{text}`".replace("|", "\\|") if text else "none"

    def name(cls: type) -> str:
        return f"`{cls.__module__.removeprefix('split_trainer.')}.{cls.__qualname__}`"

    calls = [f"| `{method}`{' (numbered)' if spec.numbered else ''} | "
             f"{code(', '.join(f'{arg}: {shape.sig}' for arg, shape in spec.args))} | {code(spec.reply.sig)} |"
             for method, spec in SCHEMAS.items()]
    records = [f"| `{wire}` | {name(r.cls)} | {code(', '.join(f'{f}: {shape.sig}' for f, shape in r.fields.items()))} |"
               for wire, r in RECORDS.items()]
    enums = [f"| `{wire}` | {name(cls)} (enum) | {code(' | '.join(repr(m.value) for m in cls))} |"
             for wire, cls in ENUMS.items()]
    return ("\n".join(["| call | arguments | reply |", "| --- | --- | --- |", *calls]) + "\n",
            "\n".join(["| wire name | class | fields |", "| --- | --- | --- |", *records, *enums]) + "\n")
