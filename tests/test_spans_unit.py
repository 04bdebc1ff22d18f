"""The OTLP messages encoded by hand are the ones protobuf writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from rlm_mlflow._exporters import otlp
from rlm_mlflow._exporters.spans import Ids, SpanBuilder
from rlm_mlflow._transports.base import parse_spans_request


def reference_value(value: Any) -> common_pb2.AnyValue:
    """What the exporter means by each kind of attribute value, built with protobuf."""
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    if isinstance(value, dict):
        return common_pb2.AnyValue(
            kvlist_value=common_pb2.KeyValueList(
                values=[
                    common_pb2.KeyValue(key=str(k), value=reference_value(v))
                    for k, v in value.items()
                    if v is not None
                ]
            )
        )
    if isinstance(value, list | tuple):
        return common_pb2.AnyValue(
            array_value=common_pb2.ArrayValue(values=[reference_value(v) for v in value])
        )
    return common_pb2.AnyValue(string_value=str(value))


ATTRIBUTES: dict[str, Any] = {
    "text": "print('héllo ✓')\n" * 50,
    "empty": "",
    "yes": True,
    "no": False,
    "zero": 0,
    "negative": -5,
    "int64 max": 2**63 - 1,
    "beyond int64": 2**70,
    "double": 0.25,
    "nan": float("nan"),
    "nested": {"code": "x = 1", "usage": {"input_tokens": 3, "output_tokens": 0}, "gone": None},
    "empty mapping": {},
    "list": ["a", 1, 2.5, None, ["b"]],
    "skipped": None,
    "long": "x" * 70_000,  # a three-byte length prefix
}


@pytest.mark.parametrize(
    ("parent", "start", "code", "message"),
    [
        (b"p" * 8, 1_700_000_000_000_000_000, otlp.STATUS_OK, None),
        (None, 0, otlp.STATUS_UNSET, None),
        (b"q" * 8, 5, otlp.STATUS_ERROR, "the step failed"),
    ],
)
def test_a_span_encoded_by_hand_is_the_span_protobuf_writes(
    parent: bytes | None, start: int, code: int, message: str | None
) -> None:
    ours = otlp.span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_id=parent,
        name="step 3: run_python",
        start_ns=start,
        end_ns=start + 10,
        attributes=ATTRIBUTES,
        status_code=code,
        status_message=message,
    )
    reference = trace_pb2.Span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_span_id=parent or b"",
        name="step 3: run_python",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 10,
        attributes=[
            common_pb2.KeyValue(key=key, value=reference_value(value))
            for key, value in ATTRIBUTES.items()
            if value is not None
        ],
        status=trace_pb2.Status(code=code, message=message or ""),  # type: ignore[arg-type]
    )
    assert ours == reference.SerializeToString()
    parsed = trace_pb2.Span.FromString(ours)
    assert parsed.attributes[0].value.string_value == ATTRIBUTES["text"]


def test_a_lone_surrogate_in_a_text_is_replaced_not_raised() -> None:
    encoded = otlp.any_value("bad \udcff text")
    assert common_pb2.AnyValue.FromString(encoded).string_value == "bad \ufffd text"


def test_a_request_framed_by_hand_parses_as_the_one_protobuf_builds() -> None:
    builder = SpanBuilder(Ids("t"))
    spans = [
        trace_pb2.Span(
            trace_id=n.to_bytes(16, "big"),
            span_id=n.to_bytes(8, "big"),
            name=f"step {n}",
            attributes=[
                common_pb2.KeyValue(key="out", value=common_pb2.AnyValue(string_value="x" * size))
            ],
        )
        # Sizes around each length-prefix boundary (1, 2 and 3 byte varints).
        for n, size in enumerate((0, 100, 127, 128, 16_383, 16_384, 70_000))
    ]
    for chosen in ([], spans[:1], spans):
        body = builder.request([s.SerializeToString() for s in chosen])
        expected = trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=resource_pb2.Resource(
                        attributes=[
                            common_pb2.KeyValue(
                                key="service.name",
                                value=common_pb2.AnyValue(string_value="rlm-mlflow"),
                            )
                        ]
                    ),
                    scope_spans=[
                        trace_pb2.ScopeSpans(
                            scope=common_pb2.InstrumentationScope(name="rlm_mlflow"), spans=chosen
                        )
                    ],
                )
            ]
        )
        assert parse_spans_request(body) == expected
        assert body == expected.SerializeToString()


def test_int_subclasses_and_huge_ints_encode_at_once_and_never_raise() -> None:
    """An IntEnum is an int subclass: it is written as its plain int (a ``range`` membership
    test on a subclass walks the whole range, holding the interpreter); an int beyond int64 as
    its text; a value whose ``__str__`` raises as its type's name. In a child process, so a
    hang is a failure, not a stuck suite."""
    program = textwrap.dedent(
        """
        import enum, sys
        from opentelemetry.proto.common.v1 import common_pb2
        from rlm_mlflow._exporters import otlp

        class Level(enum.IntEnum):
            HIGH = 3

        class Hostile(int):
            def __eq__(self, other):
                raise RuntimeError("no")
            __hash__ = int.__hash__

        class Unprintable:
            def __str__(self):
                raise RuntimeError("no")

        sys.set_int_max_str_digits(4300)
        for value in (Level.HIGH, Hostile(-5), 2**70, 10**5000, Unprintable()):
            parsed = common_pb2.AnyValue.FromString(otlp.any_value(value))
            print(parsed.WhichOneof("value"), getattr(parsed, parsed.WhichOneof("value")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "int_value 3",
        "int_value -5",
        f"string_value {2**70}",
        f"string_value <int of {(10**5000).bit_length()} bits>",
        "string_value <Unprintable>",
    ]
