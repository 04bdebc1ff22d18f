"""The OTLP request framed by hand is the request protobuf would build."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from rlm_mlflow._exporters.spans import Ids, SpanBuilder
from rlm_mlflow._transports.base import parse_spans_request


def span(number: int, text_size: int) -> trace_pb2.Span:
    return trace_pb2.Span(
        trace_id=number.to_bytes(16, "big"),
        span_id=number.to_bytes(8, "big"),
        name=f"step {number}",
        attributes=[
            common_pb2.KeyValue(key="out", value=common_pb2.AnyValue(string_value="x" * text_size))
        ],
    )


def test_a_request_framed_by_hand_parses_as_the_one_protobuf_builds() -> None:
    builder = SpanBuilder(Ids("t"))
    # Sizes around each length-prefix boundary (1, 2 and 3 byte varints), and none at all.
    spans = [span(n, size) for n, size in enumerate((0, 100, 127, 128, 16_383, 16_384, 70_000))]
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
