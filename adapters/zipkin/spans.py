"""tracespan instances as Zipkin v2 spans, the way Mixer's zipkin adapter reported them.

Mixer (mixer/pkg/adapter/opencensus/trace.go, then OpenCensus's zipkin exporter) sent a SERVER
span, or a CLIENT span for ``clientSpan``, whose local endpoint is the destination workload (the
source for a client span); ``http.status_code`` and an ``error`` tag for a failing status, named
by OpenCensus's mapping of HTTP statuses to rpc codes; the request's and response's total sizes
as "Received N bytes" / "Sent N bytes" annotations at the start and the end; and, with
``rewriteClientSpanId``, a client span's id (a server span's parent) XORed with a fixed pad, so
that the client and server spans of one hop are parent and child. The remote endpoint is the
other side, which Mixer left out. The Zipkin v2 model: https://zipkin.io/zipkin-api/
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from typing import Any, NamedTuple

from mixerhub.attributes import format_value
from mixerhub.templates import IPAddress, TraceSpanInstance

_HEX = re.compile(r"[0-9a-f]+")
# Mixer's pad for rewriteClientSpanId (opencensus/trace.go).
_PAD = 0x3F6A2EC3C810C2AB
_MICROSECOND = datetime.timedelta(microseconds=1)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

# OpenCensus's ochttp.TraceStatus: HTTP statuses as rpc codes; other 2xx and 3xx are OK.
_HTTP_STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

Span = dict[str, Any]


class InvalidId(ValueError):
    """A trace or span id that is neither B3 hex nor found in a traceparent or b3 header."""


def ids(instance: TraceSpanInstance) -> tuple[str, str, str] | None:
    """(traceId, id, parentId or "") in Zipkin's form; None when the span has no trace id at all.
    Raises InvalidId when an id is there but malformed.

    Each field may hold a bare id (X-B3-TraceId, X-B3-SpanId, X-B3-ParentSpanId), a single b3
    header (traceid-spanid[-sampled[-parentspanid]]) or a W3C traceparent header
    (version-traceid-parentid-flags, whose parent-id, the id of the span that sent the request,
    is the span's id). A header in traceId alone supplies the span id (and b3's parent) too.
    """
    trace_text = instance.trace_id.strip().lower()
    if not trace_text:
        return None
    header = _header(trace_text)
    trace = _hex_id(header.trace if header else trace_text, 32, "trace id")

    span_text = instance.span_id.strip().lower()
    parent_text = instance.parent_span_id.strip().lower()
    if span_text:
        h = _header(span_text)
        span_text = h.span if h else span_text
    elif header:
        span_text = header.span
        parent_text = parent_text or header.parent
    span = _hex_id(span_text, 16, "span id")

    if parent_text:
        h = _header(parent_text)
        if h:
            parent_text = h.span if h.w3c else h.parent
    # Mixer ignored a parent id it could not parse: the span stays, as a root.
    try:
        parent = _hex_id(parent_text, 16, "parent id") if parent_text else ""
    except InvalidId:
        parent = ""
    return trace, span, "" if parent == span else parent


class _Header(NamedTuple):
    trace: str
    span: str
    parent: str
    w3c: bool


def _header(text: str) -> _Header | None:
    """A traceparent or single b3 header's ids (unchecked hex); None for anything else."""
    parts = text.split("-")
    if len(parts) >= 4 and len(parts[0]) == 2:
        version, trace, parent, flags = parts[:4]
        if version == "ff" or (version == "00" and len(parts) != 4):
            return None
        if len(trace) == 32 and len(parent) == 16 and len(flags) == 2:
            return _Header(trace, parent, "", True)
        return None
    if 2 <= len(parts) <= 4 and len(parts[0]) in (16, 32) and len(parts[1]) == 16:
        return _Header(parts[0], parts[1], parts[3] if len(parts) == 4 else "", False)
    return None


def _hex_id(value: str, max_digits: int, what: str) -> str:
    """16 lowercase hex digits, or 32 for a 128-bit trace id (one whose high half is zero is
    written as 64-bit, as Zipkin does). Shorter ids are zero-padded, as Mixer's B3 parser did."""
    text = value.strip().lower()
    if not text or len(text) > max_digits or not _HEX.fullmatch(text):
        raise InvalidId(f"{what} {value!r} is not 1 to {max_digits} hex digits")
    number = int(text, 16)
    if number == 0:
        raise InvalidId(f"{what} is zero")
    return f"{number:016x}" if number < 1 << 64 else f"{number:032x}"


def sampled(trace_id: str, probability: float) -> bool:
    """Whether a trace is sampled: decided by its id, so every span of a trace goes or none.

    OpenCensus's ProbabilitySampler, on the low 64 bits (OpenCensus read the high ones, which are
    zero in a 64-bit B3 trace id: it sampled every such trace).
    """
    if probability >= 1:
        return True
    if probability <= 0:
        return False
    return int(trace_id[-16:], 16) >> 1 < int(probability * (1 << 63))


def span(instance: TraceSpanInstance, trace_id: str, span_id: str, parent_id: str) -> Span:
    i = instance
    if i.rewrite_client_span_id:
        if i.client_span:
            span_id = _rewrite(span_id)
        else:
            parent_id = _rewrite(span_id)
    out: Span = {"traceId": trace_id, "id": span_id}
    if parent_id:
        out["parentId"] = parent_id
    out["kind"] = "CLIENT" if i.client_span else "SERVER"
    if i.span_name:
        out["name"] = i.span_name
    if i.start_time is not None:
        out["timestamp"] = _micros(i.start_time)
        if i.end_time is not None and i.end_time > i.start_time:
            # Zipkin: at least 1 µs for a span that lasted at all.
            out["duration"] = max(1, round((i.end_time - i.start_time) / _MICROSECOND))
    local = (
        (i.source_name, i.source_ip) if i.client_span else (i.destination_name, i.destination_ip)
    )
    remote = (
        (i.destination_name, i.destination_ip) if i.client_span else (i.source_name, i.source_ip)
    )
    # Mixer named a workload it did not know "default".
    out["localEndpoint"] = _endpoint(local[0] or "default", local[1])
    if remote[0] or remote[1] is not None:
        out["remoteEndpoint"] = _endpoint(*remote)
    annotations = _annotations(i)
    if annotations:
        out["annotations"] = annotations
    tags = _tags(i)
    if tags:
        out["tags"] = tags
    return out


def _rewrite(span_id: str) -> str:
    return f"{int(span_id, 16) ^ _PAD:016x}"


def _micros(at: datetime.datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.UTC)
    return (at - _EPOCH) // _MICROSECOND


def _endpoint(name: str, ip: IPAddress | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if name:
        out["serviceName"] = name.lower()  # Zipkin's service names are lower-case
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        out["ipv4"] = str(ip)
    elif isinstance(ip, ipaddress.IPv6Address):
        out["ipv6"] = str(ip)
    return out


def _annotations(i: TraceSpanInstance) -> list[dict[str, Any]]:
    request, response = ("Sent", "Received") if i.client_span else ("Received", "Sent")
    out = []
    if i.start_time is not None:
        out.append(
            {"timestamp": _micros(i.start_time), "value": f"{request} {i.request_total_size} bytes"}
        )
    if i.end_time is not None:
        out.append(
            {"timestamp": _micros(i.end_time), "value": f"{response} {i.response_total_size} bytes"}
        )
    return out


def _tags(i: TraceSpanInstance) -> dict[str, str]:
    tags: dict[str, str] = {}
    if i.http_status_code > 0:
        tags["http.status_code"] = str(i.http_status_code)
    tags.update((str(k), _tag_value(v)) for k, v in i.span_tags.items())
    if i.http_status_code > 0:
        code = i.http_status_code
        status = _HTTP_STATUS_CODES.get(code, "OK" if 200 <= code < 400 else "UNKNOWN")
        if status != "OK":
            tags["error"] = status
    return tags


def _tag_value(value: object) -> str:
    """Zipkin's tag values are strings."""
    formatted = format_value(value)
    if isinstance(formatted, str):
        return formatted
    if isinstance(formatted, bool):
        return "true" if formatted else "false"
    if formatted is None:
        return ""
    if isinstance(formatted, int | float):
        return str(formatted)
    return json.dumps(formatted, separators=(",", ":"), sort_keys=True)
