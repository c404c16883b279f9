"""Hypothesis strategies that build any message of the public API from its proto descriptor: every
field set or not, every oneof member, scalars over their full range (NaN and infinities for floats,
unpaired surrogates excluded since protobuf refuses to serialize them), nested messages, repeated
fields. ``max_tokens`` stays small or absurd, so a generated request never runs a long generation."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

FD = FieldDescriptor
RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
}
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SPECIAL = {"max_tokens": st.sampled_from([0, 1, 3, 8, 2**32 - 1])}


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.name in SPECIAL:
        return SPECIAL[field.name]
    if field.type in RANGES:
        low, high = RANGES[field.type]
        return st.one_of(st.integers(-3, 40).filter(lambda v: low <= v <= high), st.integers(low, high))
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == FD.TYPE_FLOAT else 64)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return TEXT
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if field.type == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise NotImplementedError(field.type)


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, cls: type, depth: int = 0) -> Any:
    out = cls()
    oneof_fields = {f.name for o in descriptor.oneofs for f in o.fields if not o.name.startswith("_")}
    chosen = {draw(st.sampled_from([None, *[f.name for f in o.fields]])) for o in descriptor.oneofs
              if not o.name.startswith("_")}  # fmt: skip
    for field in descriptor.fields:
        if field.name in oneof_fields and field.name not in chosen:
            continue
        if field.name not in oneof_fields and not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE:
            if depth > 3:
                continue
            sub = getattr(out, field.name)
            strategy = message(field.message_type, GetMessageClass(field.message_type), depth + 1)
            if _repeated(field):
                del sub[:]
                for item in draw(st.lists(strategy, max_size=4)):
                    sub.add().CopyFrom(item)
            else:
                sub.CopyFrom(draw(strategy))
        elif _repeated(field):
            getattr(out, field.name).extend(draw(st.lists(scalar(field), max_size=4)))
        else:
            setattr(out, field.name, draw(scalar(field)))
    return out


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated
