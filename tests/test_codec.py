"""The wire format of the networked transport (transport.codec, transport.schema): what every call
carries round-trips exactly, and whatever bytes arrive, decoding either gives a message that matches
its declared shapes or refuses it with one WireError line; nothing in the format can run code."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import pkgutil
import re
import struct
from importlib import import_module

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import split_trainer.data
from split_trainer.config import Config, load_config
from split_trainer.core.hops import Hop, HopKind
from split_trainer.data.shards import ShardBatch
from split_trainer.transport import codec, schema
from split_trainer.transport.codec import (TENSOR, TUPLE, Answer, Call, Connect, Heartbeat, Hello, Limits, Relay,
                                           Sealed, WireError, decode, decode_answer, encode)
from split_trainer.transport.schema import RECORDS, SCHEMAS
from split_trainer.transport.wire import Packed, Reply, pack

from conftest import ROOT

FEW = settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TAG = {code: msgpack.ExtType(code, b"") for code in (codec.TUPLE, codec.TENSOR, codec.ENUM, codec.RECORD)}


# -- hypothesis strategies, read off the declared shapes ---------------------------------------------
@st.composite
def tensors(draw, kinds: tuple[str, ...], ndim=None) -> torch.Tensor:
    name = draw(st.sampled_from(kinds))
    shape = draw(st.lists(st.integers(0, 3), min_size=ndim or 0, max_size=3 if ndim is None else ndim))
    size = math.prod(shape) * schema.ITEMSIZE[name]
    data = draw(st.binary(min_size=size, max_size=size))  # any bit pattern: NaNs, float8's and bfloat16's included
    if name == "bool":
        data = bytes(b & 1 for b in data)
    dtype = schema.DTYPES[name]
    return (torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)


def plain(state: bool) -> st.SearchStrategy:
    leaves = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=5)
    if state:
        leaves |= st.binary(max_size=5) | tensors(tuple(schema.DTYPES))
    keys = st.text(max_size=4) | st.integers(-2**63, 2**63 - 1)

    def grow(inner):
        nests = st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)
        return nests | st.lists(inner, max_size=3).map(tuple) if state else nests
    return st.recursive(leaves, grow, max_leaves=6)


LEAVES = {id(schema.Nothing): st.none(), id(schema.Bool): st.booleans(), id(schema.Int): st.integers(-2**63, 2**63 - 1),
          id(schema.Count): st.integers(0, 2**63 - 1), id(schema.Str): st.text(max_size=8),
          id(schema.Number): st.floats() | st.integers(-2**63, 2**63 - 1), id(schema.Bytes): st.binary(max_size=8),
          id(schema.AnyState): plain(True), id(schema.Plain): plain(False)}


def values(shape: schema.Shape) -> st.SearchStrategy:
    """Every value ``shape`` admits (small ones)."""
    if id(shape) in LEAVES:
        return LEAVES[id(shape)]
    kind = type(shape)
    if kind is schema.Choice:
        return st.sampled_from(shape.words)
    if kind is schema.Tensor:
        return tensors(shape.kinds, shape.ndim)
    if kind is schema.Maybe:
        return st.none() | values(shape.shape)
    if kind is schema.Either:
        return st.one_of(*map(values, shape.shapes))
    if kind is schema.ListOf:
        return st.lists(values(shape.item), max_size=3)
    if kind is schema.TupleOf:
        return st.tuples(*map(values, shape.items))
    if kind is schema.DictOf:
        return st.dictionaries(values(shape.key), values(shape.value), max_size=3)
    if kind is schema.Keys:
        fixed = {k: values(s) for k, s in shape.keys.items()}
        return st.fixed_dictionaries({k: v for k, v in fixed.items() if k not in shape.optional},
                                     optional={k: fixed[k] for k in shape.optional})
    if kind is schema.EnumOf:
        return st.sampled_from(shape.cls)
    if kind is schema.Record:
        fields = RECORDS[schema.RECORD_NAMES[shape.cls]].fields
        return st.builds(shape.cls, **{name: values(s) for name, s in fields.items()})
    raise AssertionError(f"no strategy for {shape!r}")


def same(a, b) -> bool:
    """Equal, bit for bit and type for type: a tuple is no list, a float's bits are its value."""
    if type(a) is not type(b):
        # an OrderedDict travels as a dict
        return isinstance(a, dict) and isinstance(b, dict) and same(dict(a), dict(b))
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and a.detach().contiguous().reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):  # NamedTuples (Hop, Reply, Packed) too
        return len(a) == len(b) and all(map(same, a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def refused(data: bytes, method: str | None = None, limits: Limits = codec.LIMITS) -> str:
    """decode's one line for ``data`` (its answer's to ``method``, when given)."""
    with pytest.raises(WireError) as caught:
        decode_answer(data, method, limits) if method else decode(data, limits)
    line = str(caught.value)
    assert line and "\n" not in line and "\r" not in line, line
    return line


def decodes_or_refuses(data: bytes, method: str | None = None) -> None:
    """Anything at all: a message that passes its schema, or one WireError line; nothing else."""
    try:
        message = decode_answer(data, method) if method else decode(data)
    except WireError as exc:
        assert "\n" not in str(exc)
        return
    if isinstance(message, Call):
        codec.check_call(message)


# -- what crosses --------------------------------------------------------------------------------------
def edge_sides() -> list[type]:
    """Every placement's edge side (data.placement.EdgeSide): the classes of the data package that
    turn a first hop's source into inputs and answer calls of their own."""
    found = []
    for info in pkgutil.iter_modules(split_trainer.data.__path__, "split_trainer.data."):
        module = import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__
                  and isinstance(getattr(cls, "calls", None), tuple) and callable(getattr(cls, "inputs", None))]
    return found


def test_schemas_declare_exactly_the_calls_an_edge_answers_with_their_arguments():
    from split_trainer.training.edge import CALLS  # the test may; the transport may not import training

    sides = edge_sides()
    assert {cls.__name__ for cls in sides} >= {"CallInputs", "Shard", "PartyData"}
    answered = {name: getattr(cls, name) for cls in sides for name in cls.calls}
    assert set(SCHEMAS) == set(CALLS) | set(answered)
    for name, function in {**CALLS, **answered}.items():
        params = list(inspect.signature(function).parameters)[1:]  # less self
        assert [arg for arg, _ in SCHEMAS[name].args] == params, name
    assert [name for name, s in SCHEMAS.items() if s.numbered] == ["run"]  # Link.submit numbers training runs


def test_the_registry_declares_every_field_of_each_record():
    for name, record in RECORDS.items():
        cls = record.cls
        declared = cls._fields if hasattr(cls, "_fields") else tuple(f.name for f in dataclasses.fields(cls))
        assert tuple(record.fields) == declared, name
        assert hasattr(cls, "_fields") or cls.__dataclass_params__.frozen, f"{name} is not immutable"
    assert schema.RECORD_NAMES[ShardBatch] == "ShardBatch" and schema.ENUMS["HopKind"] is HopKind


@pytest.mark.parametrize("method", list(SCHEMAS))
@FEW
@given(data=st.data())
def test_every_call_and_its_reply_round_trip(method, data):
    spec = SCHEMAS[method]
    args = tuple(data.draw(values(shape), label=name) for name, shape in spec.args)
    seq = data.draw(st.none() | st.integers(0, 2**63 - 1)) if spec.numbered else None
    call = Call(data.draw(st.integers(0, 2**63 - 1)), method, args, 30.0, seq)
    back = decode(encode(call))
    assert type(back) is Call and (back.id, back.method, back.seq, back.timeout_s) == (call.id, method, seq, 30.0)
    assert same(back.args, args)
    result = data.draw(values(spec.reply), label="reply")
    answer = decode_answer(encode(Answer(call.id, result)), method)
    assert answer.id == call.id and answer.error is None and same(answer.result, result)


def test_the_other_messages_round_trip():
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    for message in (Hello("edge2"), Heartbeat(12.5), Connect("edge1", cfg), Answer(3, None, "edge1 failed: no memory"),
                    Relay(5, "edge3", b"n" * 16), Sealed(5, b"\x00sealed"), Sealed(6, b"", "edge3 is not attached")):
        assert decode(encode(message)) == message
    assert decode(encode(Answer.failed(4, RuntimeError("first line\nsecond line")))).error == "first line"


# -- real messages -------------------------------------------------------------------------------------
def real_model_and_optimizers():
    """A model with a buffer of each kind, and SGD with momentum and Adam after a step each."""
    with torch.random.fork_rng():  # the process's stream stays as the other tests left it
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                                    torch.nn.Linear(2 * 4 * 4, 3))
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        for opt in (sgd, adam):
            model(torch.randn(4, 1, 6, 6)).sum().backward()
            opt.step()
    return model, sgd, adam


def test_real_states_hops_and_replies_round_trip():
    model, sgd, adam = real_model_and_optimizers()
    assert 0 in sgd.state_dict()["state"]  # optimizer states are keyed by integers
    part = {"module": model.state_dict(), "optimizers": {"0": sgd.state_dict(), "1": adam.state_dict()},
            "rng": {"cpu": torch.get_rng_state()}, "data": {"epoch": 1, "next_batch": 7}}
    back = decode(encode(Call(1, "import_state", (part,), 60.0))).args[0]
    assert same(back, part) and type(back["optimizers"]["1"]["param_groups"][0]["betas"]) is tuple
    module = model.state_dict()
    assert same(decode_answer(encode(Answer(2, dict(module))), "get_state").result, dict(module))

    x = torch.randn(8, 5, requires_grad=True)
    activation = (x * 2)[:, ::2]  # requires grad, not contiguous
    work = [(Hop(HopKind.BACKWARD, 0, "edge"), activation), (Hop(HopKind.FORWARD, 0, "edge"), pack(x, "float8")),
            (Hop(HopKind.INFER, 0, "edge"), pack(x, "int8")), (Hop(HopKind.FORWARD, 0, "edge"), x.to(torch.bfloat16))]
    call = decode(encode(Call(3, "run", (work, torch.arange(8), 0.05), 60.0, 17)))
    sent = call.args[0][0][1]
    assert same(call.args[0], [(h, t.detach() if isinstance(t, torch.Tensor) else t) for h, t in work])
    assert not sent.requires_grad and sent.is_contiguous() and sent.add_(1).shape == (8, 3)  # its own, writable
    reply = Reply(output=pack(x, "float8"), loss=0.25, score=(1.5, 7, 8), labels=torch.arange(8))
    assert same(decode_answer(encode(Answer(3, reply)), "run").result, reply)
    packed = Packed(*pack(x, "int8"))
    assert same(decode_answer(encode(Answer(4, Reply(output=packed))), "run").result.output, packed)


# -- what is refused -----------------------------------------------------------------------------------
def raw(kind: str = "call", **fields) -> bytes:
    """A message's bytes as msgpack writes them, whatever they say."""
    base = {"call": {"id": 1, "method": "rss", "args": [], "timeout_s": 5.0, "seq": None},
            "answer": {"id": 1, "result": None, "error": None}}.get(kind, {})
    return msgpack.packb({"v": 1, "kind": kind, **base, **fields}, use_bin_type=True)


def tensor(dtype="float32", shape=(2,), data=None) -> list:
    return [TAG[TENSOR], dtype, list(shape), bytes(8) if data is None else data]


def record(name: str, **fields) -> list:
    return [TAG[codec.RECORD], name, fields]


HOP = record("Hop", kind=[TAG[codec.ENUM], "HopKind", "forward"], segment=0, place="edge")


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def run_args(payload, labels=None) -> list:
    return [[[TAG[TUPLE], HOP, payload]], labels, 0.1]


@pytest.mark.parametrize("data, method, says", [
    (b"", None, "0 bytes does not decode (truncated)"),
    (b"\xc1", None, "not msgpack"),
    (msgpack.packb([1, 2]), None, "is a list, not a message"),
    (raw("shout"), None, "unknown message kind 'shout'"),
    (raw(v=2), None, "version 2"),
    (raw(extra=1), None, "call message has fields"),
    (raw(method="foo"), None, "unknown call 'foo'"),
    (raw(method="__class__"), None, "unknown call '__class__'"),
    (raw(method="rss", args=[1]), None, "rss: 1 arguments, expected 0"),
    (raw(method="rss", seq=3), None, "not a training call"),
    (raw(timeout_s=float("nan")), None, "call timeout_s must be a positive number of seconds"),
    (raw(id=-1), None, "call id must be a non-negative integer"),
    (raw(id=2**64 - 1), None, "outside 64 bits"),
    (raw(method="run", args=run_args(tensor(), tensor("float32", (2,)))), None,
     "run: argument 2 (labels) must be a 1-d integer tensor, got float32"),
    (raw(method="run", args=run_args(tensor("float32", (64, 10), bytes(100)))), None,
     "tensor of shape [64, 10] float32 needs 2560 bytes, got 100"),
    (raw(method="run", args=run_args(tensor("complex64"))), None, "tensor dtype 'complex64' is not one the wire takes"),
    (raw(method="run", args=run_args(tensor("float32", (-2, -1)))), None, "is not a list of at most 8 sizes"),
    (raw(method="run", args=run_args(tensor("float32", (1,) * 9, bytes(4)))), None, "at most 8 sizes"),
    (raw(method="run", args=run_args(tensor("float32", (2,), "x"))), None, "needs 8 bytes, got a str"),
    (raw(method="run", args=run_args(record("Pickle", x=1))), None, "unknown record 'Pickle'"),
    (raw(method="run", args=run_args(record("ShardBatch", split="train", epoch=0, index=0))), None,
     "record ShardBatch has fields ['epoch', 'index', 'split'], expected ['split', 'epoch', 'index', 'labels']"),
    (raw(method="run", args=run_args(record("ShardBatch", split="train", epoch=0, index=0, labels=True, x=1))), None,
     "record ShardBatch has fields"),
    (raw(method="run", args=run_args(record("ShardBatch", split="train", epoch="0", index=0, labels=True))), None,
     "run: argument 1 (work)[0][1].epoch must be a non-negative integer, got str '0'"),
    (raw(method="run", args=[[[TAG[TUPLE], record("Hop", kind=[TAG[codec.ENUM], "HopKind", "jump"], segment=0,
                                                    place="edge"), tensor()]], None, 0.1]), None,
     "'jump' is no HopKind"),
    (raw(method="run", args=[[[TAG[TUPLE], HOP, tensor()]], None, [TAG[codec.ENUM], "Signals", 9]]), None,
     "unknown enum 'Signals'"),
    (raw(method="run", args=[[[HOP, TAG[TUPLE], tensor()]], None, 0.1]), None, "a tag out of place"),
    (raw(method="gather_average", args=[[TAG[TUPLE]]]), None, "must be a list of str, got tuple"),
    (raw(method="align", args=[tensor("bool", (2,), b"\x01\x02")]), None, "neither 0 nor 1"),
    (raw(method="import_state", args=[{"a": nested(40)}]),
     None, "nested too deep"),
    (b"\x91" * 5000 + b"\xc0", None, "does not decode (nested too deep)"),
    (msgpack.packb([1, 2])[:-2] + b"\xc6\x40\x00\x00\x00" + bytes(8), None, "14 bytes does not decode (truncated)"),
    (msgpack.packb([1, 2])[:-2] + b"\xc6\x00\x00\x03\xe8" + bytes(8), None, "(truncated)"),
    (raw()[:-1] + b"\xdd\xff\xff\xff\xff", None, "exceeds max_array_len"),
    (msgpack.packb({"v": 1, "v ": 1}).replace(b"v ", b"v\xff"), None, "not UTF-8"),
    (b"\x82\xa1v\x01\xa1v\x01", None, "a map key given twice"),
    (b"\x81\xc3\x01", None, "neither a string nor a 64-bit integer"),
    (msgpack.packb([msgpack.ExtType(9, b"")]), None, "unknown tag 9"),
    (msgpack.packb([msgpack.ExtType(1, b"x")]), None, "exceeds max_ext_len"),
    (raw() + b"\x00", None, "extra bytes after the message"),
    (raw("answer", error="boom\nTraceback"), "rss", "answer error must be one line of text"),
    (raw("answer", error="boom", result=3), "rss", "both an error and a result"),
    (raw("answer", result="lots"), "rss", "rss: reply must be an integer, got str 'lots'"),
    (raw("answer", result=[TAG[TUPLE], tensor("uint8", (8,)), tensor("uint8", (2, 4))]), "psi_answer",
     "psi_answer: reply[1] must be a 1-d uint8 tensor, got 2-d"),
    (raw("answer", result={"host": "h", "threads": 1, "device": "cpu"}), "about", "got the keys"),
    (raw("answer", result=record("Reply", output=record("Packed", values=tensor(), scale=tensor(), carrier=None),
                                 loss=None, score=None, labels=None)), "run",
     "run: reply.output.values must be an 8-bit tensor, got float32"),
    (raw("hello", name=""), None, "hello name must be an edge name"),
    (raw("heartbeat", time="now"), None, "heartbeat time must be a finite number"),
    (raw("relay", id=1, peer="edge2", nonce=b"short"), None, "relay nonce must be 16 bytes"),
    (raw("sealed", id=1, blob="text", error=None), None, "sealed blob must be bytes"),
])
def test_malformed_messages_are_refused_with_one_line(data, method, says):
    line = refused(data, method)
    assert says in line, line


def test_limits_bound_a_message():
    big = encode(Call(1, "set_state", ({"w": torch.zeros(100)},), 5.0))
    assert "over the limit of 100 bytes" in refused(big, limits=Limits(max_bytes=100))
    long = encode(Call(1, "gather_average", ([str(i) for i in range(50)],), 5.0))
    assert "50 exceeds max_array_len(10)" in refused(long, limits=Limits(max_elements=10))
    many = encode(Call(1, "import_state", ({str(i): [1, 2, 3] for i in range(8)},), 5.0))  # 8 x 3 + 8 + ...
    assert "more than 30 elements" in refused(many, limits=Limits(max_elements=30))
    deep = encode(Call(1, "import_state", ({"a": [[[1]]]},), 5.0))
    assert "nested too deep" in refused(deep, limits=Limits(max_depth=3))
    with pytest.raises(WireError, match="over the limit"):
        encode(Call(1, "set_state", ({"w": torch.zeros(100)},), 5.0), Limits(max_bytes=100))


@pytest.mark.parametrize("message, says", [
    (Call(1, "run", ([], torch.zeros(3), 0.1), 5.0),
     "run: argument 2 (labels) must be a 1-d integer tensor, got float32"),
    (Call(1, "set_state", ({"w": torch.zeros(2, dtype=torch.complex64)},), 5.0), "must be a tensor, got complex64"),
    (Call(1, "import_state", ({"a": {1.5: 2}},), 5.0), "must be a string or an integer, got float 1.5"),
    (Call(1, "import_state", ({"a": {1, 2}},), 5.0), "must be state"),
    (Call(1, "import_state", ({"a": 2**64},), 5.0), "must be state"),
    (Call(1, "import_state", ({"a": torch.zeros((1,) * 9)},), 5.0), "at most 8 dims"),
    (Call(1, "import_state", ({"a": torch.zeros(2).to_sparse()},), 5.0), "the wire takes"),
    (Call(1, "import_state", ({"a": "\ud800"},), 5.0), "cannot be encoded"),
    (Call(1, "rss", [], 5.0), "rss: arguments must be a tuple, got list"),
    (Call(1, "exec", (), 5.0), "unknown call 'exec'"),
    (Hello("edge1\nedge2"), "hello name must be an edge name"),
    (Connect("edge1", {"train": {}}), "connect config must be a Config"),
    (Answer(1, {1, 2}), "cannot send a set"),
    ("call", "cannot send a str: not a message"),
])
def test_what_cannot_be_sent_is_refused_where_it_is_sent(message, says):
    with pytest.raises(WireError) as caught:
        encode(message)
    assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_cycle_is_refused_not_followed():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(WireError, match="nested too deep"):
        encode(Answer(1, cyclic))


def test_a_connect_message_carries_a_config_checked_as_a_config_file():
    cfg = Config()
    good = encode(Connect("edge1", cfg))
    assert decode(good).config == cfg
    bad = raw("connect", edge="edge1", config={**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "lr": "fast"}})
    assert "connect: the central's config is refused: train.lr must be float" in refused(bad)
    unknown = raw("connect", edge="edge1", config={"trian": {}})
    assert "unknown config key trian" in refused(unknown)
    # An import path is code: the edge builds it only when its own config names the same one.
    model = {**cfg.to_dict()["model"], "name": "os:system"}
    named = raw("connect", edge="edge1", config={**cfg.to_dict(), "model": model})
    assert "names model.name=os:system, an import path" in refused(named)
    assert decode(named, trusted_model="os:system").config.model.name == "os:system"


# -- whatever arrives ----------------------------------------------------------------------------------
@functools.cache
def valid_messages() -> list[tuple[bytes, str | None]]:
    """A training call, a checkpoint part with an optimizer's state, a reply, a pair of tensors, a config."""
    _, sgd, _ = real_model_and_optimizers()
    work = [(Hop(HopKind.BACKWARD, 0, "edge"), torch.randn(2, 3)), (Hop(HopKind.FORWARD, 0, "edge"),
                                                                    ShardBatch("train", 0, 5, True))]
    return [(encode(Call(7, "run", (work, torch.arange(2), 0.1), 9.0, 4)), None),
            (encode(Call(8, "import_state", ({"optimizers": {"0": sgd.state_dict()}},), 9.0)), None),
            (encode(Answer(7, Reply(pack(torch.randn(2, 3), "float8"), 0.5, None, torch.arange(2)))), "run"),
            (encode(Answer(9, (torch.zeros(3, dtype=torch.uint8), torch.ones(2, dtype=torch.uint8)))), "psi_answer"),
            (encode(Connect("edge1", Config())), None),
            (encode(Relay(3, "edge2", bytes(range(16)))), None),
            (encode(Sealed(3, bytes(range(40)))), None)]


def test_every_truncation_of_a_valid_message_is_refused():
    for data, method in valid_messages():
        decodes_or_refuses(data, method)  # whole: decodes
        for end in range(len(data)):
            refused(data[:end], method)


@settings(max_examples=60, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_random_bytes_are_refused(data):
    decodes_or_refuses(data)


@settings(max_examples=60, deadline=None, database=None)
@given(st.data())
def test_flipped_bytes_decode_to_what_the_schema_admits_or_are_refused(data):
    message, method = data.draw(st.sampled_from(valid_messages()))
    flipped = bytearray(message)
    for at in data.draw(st.lists(st.integers(0, len(message) - 1), min_size=1, max_size=3)):
        flipped[at] = data.draw(st.integers(0, 255))
    decodes_or_refuses(bytes(flipped), method)


# -- no code runs --------------------------------------------------------------------------------------
FORBIDDEN = [(re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b"), "pickle"), (re.compile(r"(?<![\w.])eval\("), "eval("),
             (re.compile(r"(?<![\w.])exec\("), "exec("), (re.compile(r"\bimportlib\b|__import__"), "importlib"),
             (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load( without weights_only=True")]


def test_the_wire_format_modules_name_nothing_that_runs_code():
    # transport/rpc.py is torch RPC, which pickles every call internally: that transport is exempt by
    # name, and the wire format exists so that the networked one needs none of it. The networked
    # transport's own modules (transport/grpc*.py, as they come) are held to the same rule.
    transport = ROOT / "split_trainer" / "transport"
    modules = [transport / "codec.py", transport / "schema.py", transport / "identity.py", transport / "revocation.py",
               *sorted(transport.glob("grpc*.py"))]
    for path in modules:
        text = path.read_text()
        for pattern, what in FORBIDDEN:
            assert not pattern.search(text), f"{path.name} uses {what}"


def test_the_page_shows_the_declared_tables():
    page = (ROOT / "docs" / "wire-format.md").read_text()
    for table in schema.tables():
        assert table in page, "docs/wire-format.md: paste in transport.schema.tables()'s output"
