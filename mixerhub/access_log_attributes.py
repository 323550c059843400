"""Envoy access-log entries (HTTP and TCP) as Mixer attributes, each computed on first read.

The reporting workload comes from the stream's first message (its node metadata, with Istio's
keys) and holds for the stream's life. Whether it reports as the destination (an inbound
listener, Istio's reporter="destination") or the source (outbound) comes from the log name:
``mixerhub bootstrap`` logs its inbound listener as "mixerhub"; a log name ending in "outbound"
reports the source side.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from mixerhub.bag import ABSENT, LazyBag, namespace_of, parse_ip, principal

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True)
class Reporter:
    """The workload whose Envoy sent the log stream."""

    name: str = ""
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    kind: str = "inbound"  # inbound | outbound
    uid: str = ""

    @classmethod
    def from_identifier(cls, identifier: Any) -> Reporter:
        """From StreamAccessLogsMessage.identifier: node metadata with Istio's keys."""
        fields = identifier.node.metadata.fields

        def text(key: str) -> str:
            value = fields.get(key)
            return value.string_value if value is not None else ""

        labels_value = fields.get("LABELS")
        labels = (
            {k: v.string_value for k, v in labels_value.struct_value.fields.items()}
            if labels_value is not None
            else {}
        )
        name, namespace = text("WORKLOAD_NAME"), text("NAMESPACE")
        kind = "outbound" if identifier.log_name.endswith("outbound") else "inbound"
        uid = f"kubernetes://{name}.{namespace}" if name and namespace else identifier.node.id
        return cls(name, namespace, labels, text("SERVICE_ACCOUNT"), kind, uid)


class EntryContext:
    __slots__ = ("common", "entry", "reporter", "start")

    def __init__(self, entry: Any, reporter: Reporter) -> None:
        self.entry = entry
        self.common = entry.common_properties
        self.reporter = reporter
        self.start: Any = None  # request.time, computed once: three attributes need it


Extractor = Callable[[EntryContext], Any]


def http_bag(entry: accesslog_pb2.HTTPAccessLogEntry, reporter: Reporter) -> LazyBag[EntryContext]:
    """Every attribute, computed on first read (for tests and tools)."""
    return LazyBag(EntryContext(entry, reporter), HTTP_EXTRACTORS)


def tcp_bag(entry: accesslog_pb2.TCPAccessLogEntry, reporter: Reporter) -> LazyBag[EntryContext]:
    return LazyBag(EntryContext(entry, reporter), TCP_EXTRACTORS)


class BagPlan:
    """The attributes one configuration reads, extracted up front into a plain dict.

    On the report path nearly every referenced attribute is read for every entry, and a plain
    dict reads at C speed where a self-filling bag pays a Python call per read; so each
    snapshot plans its extraction once and each entry runs just that plan.
    """

    def __init__(self, referenced: frozenset[str]) -> None:
        self.http = tuple((n, f) for n, f in HTTP_EXTRACTORS.items() if n in referenced)
        self.tcp = tuple((n, f) for n, f in TCP_EXTRACTORS.items() if n in referenced)

    def http_bag(self, entry: Any, reporter: Reporter) -> dict[str, Any]:
        return _extract(self.http, EntryContext(entry, reporter))

    def tcp_bag(self, entry: Any, reporter: Reporter) -> dict[str, Any]:
        return _extract(self.tcp, EntryContext(entry, reporter))


def _extract(plan: tuple[tuple[str, Extractor], ...], c: EntryContext) -> dict[str, Any]:
    bag = {}
    for name, extract in plan:
        value = extract(c)
        if value is not ABSENT:
            bag[name] = value
    return bag


def _ip(address: address_pb2.Address) -> Any:
    return parse_ip(address.socket_address.address)


def _port(address: address_pb2.Address) -> Any:
    return address.socket_address.port_value if address.HasField("socket_address") else ABSENT


def _duration(d: Any) -> datetime.timedelta:
    return datetime.timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def _start(c: EntryContext) -> Any:
    if c.start is None:
        t = c.common.start_time
        c.start = (
            _EPOCH + datetime.timedelta(seconds=t.seconds, microseconds=t.nanos // 1000)
            if t.seconds or t.nanos
            else ABSENT
        )
    return c.start


def _elapsed(c: EntryContext) -> Any:
    common = c.common
    if common.HasField("duration"):
        return _duration(common.duration)
    if common.HasField("time_to_last_downstream_tx_byte"):
        return _duration(common.time_to_last_downstream_tx_byte)
    return ABSENT


def _end(c: EntryContext) -> Any:
    start, elapsed = _start(c), _elapsed(c)
    return ABSENT if start is ABSENT or elapsed is ABSENT else start + elapsed


def _san(properties: Any) -> Any:
    for san in properties.subject_alt_name:
        if san.uri:
            return principal(san.uri)
    return ABSENT


def _peer_principal(c: EntryContext) -> Any:
    return _san(c.common.tls_properties.peer_certificate_properties)


def _local_principal(c: EntryContext) -> Any:
    return _san(c.common.tls_properties.local_certificate_properties)


# Envoy's short response-flag codes (%RESPONSE_FLAGS%), which Istio reports as response_flags.
_FLAGS = (
    ("failed_local_healthcheck", "LH"), ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"), ("local_reset", "LR"), ("upstream_remote_reset", "UR"),
    ("upstream_connection_failure", "UF"), ("upstream_connection_termination", "UC"),
    ("upstream_overflow", "UO"), ("no_route_found", "NR"), ("delay_injected", "DI"),
    ("fault_injected", "FI"), ("rate_limited", "RL"), ("rate_limit_service_error", "RLSE"),
    ("downstream_connection_termination", "DC"), ("upstream_retry_limit_exceeded", "URX"),
    ("stream_idle_timeout", "SI"), ("invalid_envoy_request_headers", "IH"),
    ("downstream_protocol_error", "DPE"), ("upstream_max_stream_duration_reached", "UMSDR"),
    ("response_from_cache_filter", "RFCF"), ("no_filter_config_found", "NFCF"),
    ("duration_timeout", "DT"), ("upstream_protocol_error", "UPE"), ("no_cluster_found", "NC"),
    ("overload_manager", "OM"), ("dns_resolution_failure", "DF"),
    ("downstream_remote_reset", "DRR"),
)  # fmt: skip


_FLAG_CODES = {name: code for name, code in _FLAGS} | {"unauthorized_details": "UAEX"}


def _response_flags(c: EntryContext) -> str:
    # ListFields() names only the flags that are set, in C: most entries have none.
    fields = c.common.response_flags.ListFields()
    if not fields:
        return "-"
    return ",".join(_FLAG_CODES[f.name] for f, value in fields if value and f.name in _FLAG_CODES)


_METHODS = {
    1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 6: "CONNECT", 7: "OPTIONS",
    8: "TRACE", 9: "PATCH",
}  # fmt: skip


def _request(c: EntryContext) -> Any:
    return c.entry.request


def _response(c: EntryContext) -> Any:
    return c.entry.response


def _text(get: Callable[[EntryContext], str]) -> Extractor:
    def extract(c: EntryContext) -> Any:
        return get(c) or ABSENT

    return extract


def _url_path(c: EntryContext) -> Any:
    path = c.entry.request.path
    return path.split("?", 1)[0] if path else ABSENT


def _host(c: EntryContext) -> Any:
    authority = c.entry.request.authority
    if not authority:
        return ABSENT
    if authority.startswith("["):  # [v6]:port
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _service_name(host: Any) -> Any:
    """reviews.shop.svc.cluster.local -> reviews; an address names no service."""
    if host is ABSENT or parse_ip(host.strip("[]")) is not ABSENT:
        return ABSENT
    return host.split(".", 1)[0]


def _protocol(c: EntryContext) -> str:
    content_type = c.entry.request.request_headers.get("content-type", "")
    return "grpc" if content_type.startswith("application/grpc") else "http"


def _grpc_status(c: EntryContext) -> Any:
    response = c.entry.response
    return (
        response.response_trailers.get("grpc-status")
        or response.response_headers.get("grpc-status")
        or ABSENT
    )


def _response_code(c: EntryContext) -> Any:
    response = c.entry.response
    return response.response_code.value if response.HasField("response_code") else ABSENT


def _request_headers(c: EntryContext) -> dict[str, str]:
    request = c.entry.request
    headers = dict(request.request_headers)
    # The fields Envoy logs on their own are headers too, for expressions written Mixer's way.
    for name, value in (
        (":authority", request.authority), (":path", request.path),
        ("user-agent", request.user_agent), ("referer", request.referer),
        ("x-request-id", request.request_id), ("x-forwarded-for", request.forwarded_for),
    ):  # fmt: skip
        if value and name not in headers:
            headers[name] = value
    if request.request_method:
        headers.setdefault(":method", _METHODS.get(request.request_method, ""))
    return headers


def _side(inbound: Extractor, outbound: Extractor) -> Extractor:
    """An attribute that comes from different places for an inbound or an outbound reporter."""

    def extract(c: EntryContext) -> Any:
        return inbound(c) if c.reporter.kind == "inbound" else outbound(c)

    return extract


def _reporter(get: Callable[[Reporter], Any]) -> Extractor:
    def extract(c: EntryContext) -> Any:
        value = get(c.reporter)
        return value if value else ABSENT

    return extract


def _none(c: EntryContext) -> Any:
    return ABSENT


# What both HTTP and TCP entries carry.
COMMON_EXTRACTORS: Mapping[str, Extractor] = {
    "source.ip": _side(lambda c: _ip(c.common.downstream_remote_address),
                       lambda c: _ip(c.common.downstream_local_address)),
    "source.port": _side(lambda c: _port(c.common.downstream_remote_address), _none),
    "destination.ip": _side(lambda c: _ip(c.common.downstream_local_address),
                            lambda c: _ip(c.common.upstream_remote_address)),
    "destination.port": _side(lambda c: _port(c.common.downstream_local_address),
                              lambda c: _port(c.common.upstream_remote_address)),
    "source.principal": _side(_peer_principal, _local_principal),
    "source.user": _side(_peer_principal, _local_principal),
    "destination.principal": _side(_local_principal, _peer_principal),
    "source.namespace": _side(lambda c: namespace_of(_peer_principal(c)),
                              _reporter(lambda r: r.namespace)),
    "source.workload.namespace": _side(lambda c: namespace_of(_peer_principal(c)),
                                       _reporter(lambda r: r.namespace)),
    "source.workload.name": _side(_none, _reporter(lambda r: r.name)),
    "source.name": _side(_none, _reporter(lambda r: r.name)),
    "source.labels": _side(_none, _reporter(lambda r: dict(r.labels))),
    "source.serviceAccount": _side(_none, _reporter(lambda r: r.service_account)),
    "destination.workload.name": _side(_reporter(lambda r: r.name), _none),
    "destination.name": _side(_reporter(lambda r: r.name), _none),
    "destination.workload.namespace": _side(_reporter(lambda r: r.namespace), _none),
    "destination.namespace": _side(_reporter(lambda r: r.namespace), _none),
    "destination.workload.uid": _side(_reporter(lambda r: r.uid), _none),
    "destination.labels": _side(_reporter(lambda r: dict(r.labels)), _none),
    "destination.serviceAccount": _side(_reporter(lambda r: r.service_account), _none),
    "connection.mtls": lambda c: bool(_peer_principal(c) is not ABSENT),
    "connection.requested_server_name": _text(lambda c: c.common.tls_properties.tls_sni_hostname),
    "context.reporter.kind": lambda c: c.reporter.kind,
    "context.reporter.uid": _reporter(lambda r: r.uid),
    "context.reporter.workload": _reporter(lambda r: r.name),
    "context.proxy_error_code": _response_flags,
    "context.time": _end,
}  # fmt: skip

HTTP_EXTRACTORS: Mapping[str, Extractor] = {
    **COMMON_EXTRACTORS,
    "context.protocol": _protocol,
    "request.time": _start,
    "response.time": _end,
    "response.duration": _elapsed,
    "request.method": lambda c: _METHODS.get(c.entry.request.request_method, ABSENT),
    "request.scheme": _text(lambda c: c.entry.request.scheme),
    "request.host": _text(lambda c: c.entry.request.authority),
    "request.path": _text(lambda c: c.entry.request.path),
    "request.url_path": _url_path,
    "request.useragent": _text(lambda c: c.entry.request.user_agent),
    "request.referer": _text(lambda c: c.entry.request.referer),
    "request.id": _text(lambda c: c.entry.request.request_id),
    "request.headers": _request_headers,
    "request.size": lambda c: c.entry.request.request_body_bytes,
    "request.total_size": lambda c: (
        c.entry.request.request_headers_bytes + c.entry.request.request_body_bytes
    ),
    "response.code": _response_code,
    "response.size": lambda c: c.entry.response.response_body_bytes,
    "response.total_size": lambda c: (
        c.entry.response.response_headers_bytes + c.entry.response.response_body_bytes
    ),
    "response.headers": lambda c: dict(c.entry.response.response_headers),
    "response.grpc_status": _grpc_status,
    "response.grpc_message": _text(
        lambda c: c.entry.response.response_trailers.get("grpc-message", "")
    ),
    "destination.service.host": _host,
    "destination.service.name": lambda c: _service_name(_host(c)),
    "destination.service.namespace": _side(_reporter(lambda r: r.namespace), _none),
}

TCP_EXTRACTORS: Mapping[str, Extractor] = {
    **COMMON_EXTRACTORS,
    "context.protocol": lambda c: "tcp",
    "connection.received.bytes": lambda c: c.entry.connection_properties.received_bytes,
    "connection.received.bytes_total": lambda c: c.entry.connection_properties.received_bytes,
    "connection.sent.bytes": lambda c: c.entry.connection_properties.sent_bytes,
    "connection.sent.bytes_total": lambda c: c.entry.connection_properties.sent_bytes,
    "connection.duration": _elapsed,
    # Envoy's TCP access log writes one entry when the connection closes.
    "connection.event": lambda c: "close",
    "destination.service.host": _text(lambda c: c.common.upstream_cluster),
    "destination.service.namespace": _side(_reporter(lambda r: r.namespace), _none),
}
