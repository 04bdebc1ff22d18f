"""OTLP spans on the wire: the few protobuf messages the traces exporter sends, encoded by hand.

Building spans as ``opentelemetry.proto`` messages copies every text once per level of nesting
(an output's text sits in an ``AnyValue`` in a ``KeyValue`` in a ``KeyValueList`` in an
``AnyValue`` in a ``KeyValue`` in the ``Span``), about 57 us for a step with 10 KB of code and
output, all of it holding the interpreter while agent threads wait to run their hooks. Here a text
is encoded to UTF-8 once and the message is one join of bytes: a few microseconds.

Only what the exporter needs is here: ``Span`` (ids, name, kind, times, attributes, status), the
``AnyValue`` kinds (string, bool, int, double, array, key-value list) and the
``ExportTraceServiceRequest`` around serialized spans. Fields are written in field-number order
and proto3 defaults left out, as protobuf itself does, so the bytes are the ones protobuf would
write (``tests/test_spans_unit.py`` compares them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

SPAN_KIND_INTERNAL = 1
STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int64 as its two's complement (ten bytes)."""
    if value < 0x80:
        if value >= 0:
            return _SMALL[value]
        value += 1 << 64
    elif value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_delimited(field: int, data: bytes) -> bytes:
    """A bytes, string or embedded-message field (``field`` below 16)."""
    return _LENGTH_KEYS[field] + varint(len(data)) + data


_LENGTH_KEYS = [_SMALL[field << 3 | 2] for field in range(16)]


def field_size(field: int, length: int) -> int:
    """Bytes a length-delimited field of ``length`` bytes takes (``field`` below 16)."""
    return 1 + len(varint(length)) + length


def _text(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (bad input): protobuf strings are UTF-8
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value).encode()


# AnyValue: 1 string_value, 2 bool_value, 3 int_value, 4 double_value, 5 array_value,
# 6 kvlist_value. A oneof member is written even when it holds its type's default.
_STRING, _BOOL, _INT, _DOUBLE_KEY = _key(1, 2), _key(2, 0), _key(3, 0), _key(4, 1)


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` holding ``value``: a mapping as a key-value list (None values left out),
    a list or tuple as an array, an int beyond int64 and anything else as its text. Never
    raises; subclasses of int, float and str are read through their base type, so no method of
    theirs runs."""
    kind = type(value)
    if kind is str:
        data = _text(value)
        return _STRING + varint(len(data)) + data
    if kind is bool:
        return _BOOL + (b"\x01" if value else b"\x00")
    if kind is int:
        return _integer(value)
    if kind is float:
        return _DOUBLE_KEY + _DOUBLE.pack(value)
    if isinstance(value, Mapping):
        return length_delimited(6, key_values(value.items()))
    if isinstance(value, list | tuple):
        return length_delimited(5, b"".join(length_delimited(1, any_value(v)) for v in value))
    if isinstance(value, int):  # an IntEnum, a numpy-like int: its plain int, compared as one
        return _integer(int.__int__(value))
    if isinstance(value, float):
        return _DOUBLE_KEY + _DOUBLE.pack(float.__float__(value))
    data = _text(str.__str__(value) if isinstance(value, str) else _describe(value))
    return _STRING + varint(len(data)) + data


def _integer(value: int) -> bytes:
    if _INT64_MIN <= value <= _INT64_MAX:
        return _INT + varint(value)
    try:
        text = str(value)
    except ValueError:  # more digits than int's text conversion allows
        text = f"<int of {value.bit_length()} bits>"
    data = text.encode()
    return _STRING + varint(len(data)) + data


def _describe(value: object) -> str:
    try:
        text = str(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if type(text) is str else f"<{type(value).__name__}>"


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue``: 1 key, 2 value."""
    head = _KEY_FIELDS.get(key)
    if head is None:
        head = length_delimited(1, _text(key))
        if len(_KEY_FIELDS) < 4096:  # attribute names repeat from span to span
            _KEY_FIELDS[key] = head
    value_bytes = any_value(value)
    return head + b"\x12" + varint(len(value_bytes)) + value_bytes  # field 2


_KEY_FIELDS: dict[str, bytes] = {}


def key_values(items: Iterable[tuple[Any, Any]]) -> bytes:
    """The ``values`` of a ``KeyValueList`` (field 1 each), None values left out."""
    return b"".join(
        length_delimited(1, key_value(str(key), value)) for key, value in items if value is not None
    )


def span(
    *,
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes | None,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    status_code: int,
    status_message: str | None = None,
) -> bytes:
    """A serialized ``Span``: 1 trace_id, 2 span_id, 4 parent_span_id, 5 name, 6 kind,
    7 start_time_unix_nano, 8 end_time_unix_nano, 9 attributes, 15 status (2 message, 3 code)."""
    parts = [length_delimited(1, trace_id), length_delimited(2, span_id)]
    if parent_id:
        parts.append(length_delimited(4, parent_id))
    if name:
        parts.append(length_delimited(5, _text(name)))
    parts.append(_key(6, 0) + varint(SPAN_KIND_INTERNAL))
    if start_ns:
        parts.append(_key(7, 1) + _FIXED64.pack(start_ns))
    if end_ns:
        parts.append(_key(8, 1) + _FIXED64.pack(end_ns))
    for key, value in attributes.items():
        if value is not None:
            parts.append(length_delimited(9, key_value(key, value)))
    status = b""
    if status_message:
        status += length_delimited(2, _text(status_message))
    if status_code:
        status += _key(3, 0) + varint(status_code)
    parts.append(length_delimited(15, status))
    return b"".join(parts)


def resource_field(attributes: Mapping[str, Any]) -> bytes:
    """``ResourceSpans.resource`` (field 1): a ``Resource`` with these attributes."""
    return length_delimited(
        1, b"".join(length_delimited(1, key_value(k, v)) for k, v in attributes.items())
    )


def scope_field(name: str) -> bytes:
    """``ScopeSpans.scope`` (field 1): an ``InstrumentationScope`` with this name."""
    return length_delimited(1, length_delimited(1, _text(name)))


def request(resource: bytes, scope: bytes, spans: Sequence[bytes]) -> bytes:
    """A serialized ``ExportTraceServiceRequest`` with one ``ResourceSpans`` (``resource``, from
    :func:`resource_field`) holding one ``ScopeSpans`` (``scope``, from :func:`scope_field`)
    holding ``spans``: one copy of the spans' bytes, lengths computed up front."""
    scope_size = len(scope) + sum(field_size(2, len(s)) for s in spans)
    resource_size = len(resource) + field_size(2, scope_size)
    parts = [_key(1, 2), varint(resource_size), resource, _key(2, 2), varint(scope_size), scope]
    key = _key(2, 2)
    for serialized in spans:
        parts.append(key)
        parts.append(varint(len(serialized)))
        parts.append(serialized)
    return b"".join(parts)
