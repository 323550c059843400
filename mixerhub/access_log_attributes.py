"""Envoy access-log entries (HTTP and TCP) as Mixer attributes, each computed on first read.

The reporting workload comes from the stream's first message (its node metadata, with Istio's
keys) and holds for the stream's life. Whether it reports as the destination (an inbound
listener, Istio's reporter="destination") or the source (outbound) comes from the log name:
``mixerhub bootstrap`` logs its inbound listener as "mixerhub"; a log name ending in "outbound"
reports the source side.
"""

from __future__ import annotations

import datetime
import functools
import linecache
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from mixerhub.bag import ABSENT, LazyBag, namespace_of, parse_ip, principal

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_timedelta = datetime.timedelta


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
    snapshot plans its extraction once and each entry runs just that plan: one generated
    function per entry type and reporter side, straight-line code that reads each protobuf
    sub-message once (a sub-message read builds a Python wrapper each time) and computes what
    several attributes share (the peer's principal, the start time) once. The generated source
    is kept in ``sources``. An attribute without a snippet in HTTP_CODE or TCP_CODE falls back
    to its extractor.
    """

    def __init__(self, referenced: frozenset[str]) -> None:
        # One function per entry type and reporter side: which side reports is known per
        # stream, so the attributes that depend on it are settled when the code is generated.
        self.sources: dict[tuple[str, bool], str] = {}
        self._functions: dict[tuple[str, bool], ExtractBag] = {}
        for kind, extractors, code in (
            ("http", HTTP_EXTRACTORS, HTTP_CODE), ("tcp", TCP_EXTRACTORS, TCP_CODE)
        ):  # fmt: skip
            for inbound in (True, False):
                name = f"{kind}_{'inbound' if inbound else 'outbound'}"
                source = _plan_source(name, extractors, code, referenced, inbound)
                self.sources[kind, inbound] = source
                self._functions[kind, inbound] = _compile_plan(name, source, extractors)

    def http_for(self, reporter: Reporter) -> ExtractBag:
        """The function extracting the bag of each HTTP entry this reporter sends."""
        return self._functions["http", reporter.kind == "inbound"]

    def tcp_for(self, reporter: Reporter) -> ExtractBag:
        return self._functions["tcp", reporter.kind == "inbound"]

    def http_bag(self, entry: Any, reporter: Reporter) -> dict[str, Any]:
        return self.http_for(reporter)(entry, reporter)

    def tcp_bag(self, entry: Any, reporter: Reporter) -> dict[str, Any]:
        return self.tcp_for(reporter)(entry, reporter)


ExtractBag = Callable[[Any, Reporter], dict[str, Any]]


class Sided(NamedTuple):
    """An attribute that comes from different places for an inbound or an outbound reporter."""

    inbound: Snippet
    outbound: Snippet


class Snippet(NamedTuple):
    """An attribute as Python source over the locals in LOCALS (and ``entry``, ``reporter``).
    ``absent``: whether it may be ABSENT, and so must be tested before it goes in the bag."""

    code: str
    needs: tuple[str, ...] = ()
    absent: bool = True


# Small reads as code, each over one message ({0}): generated dispatch inlines them (a call
# per entry and attribute is measurable), and the extractors call them as functions made from
# the same code, so both read alike.
_IP = "parse_ip({0}.socket_address.address)"
# Reading a sub-message that is not set costs more than asking whether it is.
_PEER = (
    "(_san({0}.peer_certificate_properties)"
    " if {0}.HasField('peer_certificate_properties') else ABSENT)"
)
_LOCAL = (
    "(_san({0}.local_certificate_properties)"
    " if {0}.HasField('local_certificate_properties') else ABSENT)"
)
_PROTOCOL = (
    "('grpc' if {0}.request_headers.get('content-type', '').startswith('application/grpc')"
    " else 'http')"
)
_GRPC_STATUS = (
    "({0}.response_trailers.get('grpc-status') or {0}.response_headers.get('grpc-status')"
    " or ABSENT)"
)


def _map_get(local: str, key: str, default: str) -> str:
    """``local.get(key, default)`` as code for a protobuf map: its ``get`` parses its arguments
    as keywords (about 700 instructions a call), where ``in`` and ``[]`` are slots (about 300
    for a miss, a logged map's usual answer)."""
    return f"({local}[{key!r}] if {key!r} in {local} else {default})"


# Locals the generated extraction computes at most once per entry, each from those it needs.
LOCALS: Mapping[str, Snippet] = {
    "common": Snippet("entry.common_properties"),
    "request": Snippet("entry.request"),
    "request_headers": Snippet("request.request_headers", ("request",)),
    # Fields read by more than one attribute, each read once (a read makes a new Python object).
    "authority": Snippet("request.authority", ("request",)),
    "request_body_bytes": Snippet("request.request_body_bytes", ("request",)),
    "response_body_bytes": Snippet("response.response_body_bytes", ("response",)),
    "response": Snippet("entry.response"),
    "response_headers": Snippet("response.response_headers", ("response",)),
    "response_trailers": Snippet("response.response_trailers", ("response",)),
    "conn": Snippet("entry.connection_properties"),
    "tls": Snippet("common.tls_properties", ("common",)),
    "peer": Snippet(_PEER.format("tls"), ("tls",)),
    "local": Snippet(_LOCAL.format("tls"), ("tls",)),
    "peer_namespace": Snippet("namespace_of(peer)", ("peer",)),
    "start": Snippet("_start_of(common)", ("common",)),
    "elapsed": Snippet("_elapsed_of(common)", ("common",)),
    "end": Snippet(
        "ABSENT if start is ABSENT or elapsed is ABSENT else start + elapsed", ("start", "elapsed")
    ),
    "host": Snippet("_host_of(authority)", ("authority",)),
}


def _sided(inbound: str, outbound: str, needs: tuple[str, ...] = ()) -> Sided:
    def side(code: str) -> Snippet:
        return Snippet(code, tuple(n for n in needs if re.search(rf"\b{n}\b", code)))

    return Sided(side(inbound), side(outbound))


_R_NAME, _R_NAMESPACE = "reporter.name or ABSENT", "reporter.namespace or ABSENT"
_R_LABELS = "dict(reporter.labels) or ABSENT"
_R_ACCOUNT, _R_UID = "reporter.service_account or ABSENT", "reporter.uid or ABSENT"

# The extractors of COMMON_EXTRACTORS, HTTP_EXTRACTORS and TCP_EXTRACTORS as source: the same
# reads in the same order (tests/test_report_codegen.py holds them to the same results).
COMMON_CODE: Mapping[str, Snippet | Sided] = {
    "source.ip": _sided(_IP.format("common.downstream_remote_address"),
                        _IP.format("common.downstream_local_address"), ("common",)),
    "source.port": _sided("_port(common.downstream_remote_address)", "ABSENT", ("common",)),
    "destination.ip": _sided(_IP.format("common.downstream_local_address"),
                             _IP.format("common.upstream_remote_address"), ("common",)),
    "destination.port": _sided("_port(common.downstream_local_address)",
                               "_port(common.upstream_remote_address)", ("common",)),
    "source.principal": _sided("peer", "local", ("peer", "local")),
    "source.user": _sided("peer", "local", ("peer", "local")),
    "destination.principal": _sided("local", "peer", ("peer", "local")),
    "source.namespace": _sided("peer_namespace", _R_NAMESPACE, ("peer_namespace",)),
    "source.workload.namespace": _sided("peer_namespace", _R_NAMESPACE, ("peer_namespace",)),
    "source.workload.name": _sided("ABSENT", _R_NAME),
    "source.name": _sided("ABSENT", _R_NAME),
    "source.labels": _sided("ABSENT", _R_LABELS),
    "source.serviceAccount": _sided("ABSENT", _R_ACCOUNT),
    "destination.workload.name": _sided(_R_NAME, "ABSENT"),
    "destination.name": _sided(_R_NAME, "ABSENT"),
    "destination.workload.namespace": _sided(_R_NAMESPACE, "ABSENT"),
    "destination.namespace": _sided(_R_NAMESPACE, "ABSENT"),
    "destination.workload.uid": _sided(_R_UID, "ABSENT"),
    "destination.labels": _sided(_R_LABELS, "ABSENT"),
    "destination.serviceAccount": _sided(_R_ACCOUNT, "ABSENT"),
    "connection.mtls": Snippet("peer is not ABSENT", ("peer",), absent=False),
    "connection.requested_server_name": Snippet("tls.tls_sni_hostname or ABSENT", ("tls",)),
    "context.reporter.kind": Snippet("reporter.kind", absent=False),
    "context.reporter.uid": Snippet(_R_UID),
    "context.reporter.workload": Snippet(_R_NAME),
    "context.proxy_error_code": Snippet("_flags_of(common)", ("common",), absent=False),
    "context.time": Snippet("end", ("end",)),
}  # fmt: skip

HTTP_CODE: Mapping[str, Snippet | Sided] = {
    **COMMON_CODE,
    "context.protocol": Snippet(
        "('grpc' if " + _map_get("request_headers", "content-type", "''")
        + ".startswith('application/grpc') else 'http')",
        ("request_headers",), absent=False,
    ),
    "request.time": Snippet("start", ("start",)),
    "response.time": Snippet("end", ("end",)),
    "response.duration": Snippet("elapsed", ("elapsed",)),
    "request.method": Snippet("_METHODS.get(request.request_method, ABSENT)", ("request",)),
    "request.scheme": Snippet("request.scheme or ABSENT", ("request",)),
    "request.host": Snippet("authority or ABSENT", ("authority",)),
    "request.path": Snippet("request.path or ABSENT", ("request",)),
    "request.url_path": Snippet("_url_path_of(request.path)", ("request",)),
    "request.useragent": Snippet("request.user_agent or ABSENT", ("request",)),
    "request.referer": Snippet("request.referer or ABSENT", ("request",)),
    "request.id": Snippet("request.request_id or ABSENT", ("request",)),
    "request.headers": Snippet("_headers_of(request)", ("request",), absent=False),
    "request.size": Snippet("request_body_bytes", ("request_body_bytes",), absent=False),
    "request.total_size": Snippet(
        "request.request_headers_bytes + request_body_bytes", ("request", "request_body_bytes"),
        absent=False,
    ),
    "response.code": Snippet(
        'response.response_code.value if response.HasField("response_code") else ABSENT',
        ("response",),
    ),
    "response.size": Snippet("response_body_bytes", ("response_body_bytes",), absent=False),
    "response.total_size": Snippet(
        "response.response_headers_bytes + response_body_bytes",
        ("response", "response_body_bytes"), absent=False,
    ),
    "response.headers": Snippet("_map(response.response_headers)", ("response",), absent=False),
    "response.grpc_status": Snippet(
        f"({_map_get('response_trailers', 'grpc-status', 'None')}"
        f" or {_map_get('response_headers', 'grpc-status', 'None')} or ABSENT)",
        ("response_trailers", "response_headers"),
    ),
    "response.grpc_message": Snippet(
        f"({_map_get('response_trailers', 'grpc-message', repr(''))} or ABSENT)",
        ("response_trailers",),
    ),
    "destination.service.host": Snippet("host", ("host",)),
    "destination.service.name": Snippet("_service_name(host)", ("host",)),
    "destination.service.namespace": _sided(_R_NAMESPACE, "ABSENT"),
}  # fmt: skip

TCP_CODE: Mapping[str, Snippet | Sided] = {
    **COMMON_CODE,
    "context.protocol": Snippet('"tcp"', absent=False),
    "connection.received.bytes": Snippet("conn.received_bytes", ("conn",), absent=False),
    "connection.received.bytes_total": Snippet("conn.received_bytes", ("conn",), absent=False),
    "connection.sent.bytes": Snippet("conn.sent_bytes", ("conn",), absent=False),
    "connection.sent.bytes_total": Snippet("conn.sent_bytes", ("conn",), absent=False),
    "connection.duration": Snippet("elapsed", ("elapsed",)),
    "connection.event": Snippet('"close"', absent=False),
    "destination.service.host": Snippet("common.upstream_cluster or ABSENT", ("common",)),
    "destination.service.namespace": _sided(_R_NAMESPACE, "ABSENT"),
}  # fmt: skip


def _plan_source(
    kind: str,
    extractors: Mapping[str, Extractor],
    code: Mapping[str, Snippet | Sided],
    referenced: frozenset[str],
    inbound: bool,
) -> str:
    """``def <kind>(entry, reporter)``: the referenced attributes of one entry type, for one
    reporter side, in a new dict."""
    lines = [f"def {kind}(entry, reporter):"]
    defined: set[str] = set()

    def define(name: str) -> None:
        if name in defined:
            return
        snippet = LOCALS[name]
        for need in snippet.needs:
            define(need)
        defined.add(name)
        lines.append(f"    {name} = {snippet.code}")

    body = ["    bag = {}"]
    for name in extractors:  # the extractors' order: the bag's order as before
        if name not in referenced:
            continue
        snippet = code.get(name)
        if isinstance(snippet, Sided):
            snippet = snippet.inbound if inbound else snippet.outbound
        if snippet is not None and snippet.code == "ABSENT":
            continue  # never on this side
        if snippet is None:
            if "context" not in defined:
                defined.add("context")
                lines.append("    context = EntryContext(entry, reporter)")
            body.append(f"    value = extractors[{name!r}](context)")
            body.append(f"    if value is not ABSENT: bag[{name!r}] = value")
            continue
        for need in snippet.needs:
            define(need)
        if snippet.absent:
            body.append(f"    value = {snippet.code}")
            body.append(f"    if value is not ABSENT: bag[{name!r}] = value")
        else:
            body.append(f"    bag[{name!r}] = {snippet.code}")
    return "\n".join([*lines, *body, "    return bag"]) + "\n"


def _compile_plan(
    kind: str, source: str, extractors: Mapping[str, Extractor]
) -> Callable[[Any, Reporter], dict[str, Any]]:
    filename = f"<{kind} access-log attributes>"
    namespace = plan_namespace(extractors)
    exec(compile(source, filename, "exec"), namespace)
    # Tracebacks show the generated lines; the source is also kept on the plan.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    function: ExtractBag = namespace[kind]
    return function


def plan_namespace(extractors: Mapping[str, Extractor]) -> dict[str, Any]:
    """The globals generated extraction code runs with: the helpers its snippets call."""
    return {
        "ABSENT": ABSENT, "EntryContext": EntryContext, "extractors": extractors,
        "parse_ip": parse_ip, "_san": _san, "_port": _port, "_start_of": _start_of,
        "_elapsed_of": _elapsed_of, "_host_of": _host_of, "namespace_of": namespace_of,
        "_flags_of": _flags_of, "_METHODS": _METHODS,
        "_url_path_of": _url_path_of, "_headers_of": _headers_of,
        "_service_name": _service_name, "_map": _map,
        "_header": request_header,
    }  # fmt: skip


def attribute_snippet(kind: str, name: str, inbound: bool) -> Snippet | None:
    """How generated code computes attribute ``name`` of an entry of ``kind`` ("http" or
    "tcp") for one reporter side: a snippet over LOCALS, ``entry`` and ``reporter`` (its code is
    "ABSENT" when the attribute is never present on that side); None when only its extractor
    computes it."""
    snippet = (HTTP_CODE if kind == "http" else TCP_CODE).get(name)
    if isinstance(snippet, Sided):
        return snippet.inbound if inbound else snippet.outbound
    return snippet


def _port(address: address_pb2.Address) -> Any:
    return address.socket_address.port_value if address.HasField("socket_address") else ABSENT


# timedelta(days, seconds, microseconds) positionally: keywords cost twice as much, per entry.
def _duration(d: Any) -> datetime.timedelta:
    return _timedelta(0, d.seconds, d.nanos // 1000)


def _start_of(common: Any) -> Any:
    t = common.start_time
    seconds, nanos = t.seconds, t.nanos
    if not (seconds or nanos):
        return ABSENT
    # Entries come second after second: the second's datetime is made once.
    second = _SECONDS.get(seconds)
    if second is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        second = _SECONDS[seconds] = _EPOCH + _timedelta(0, seconds)
    return second + _timedelta(0, 0, nanos // 1000)


_SECONDS: dict[int, datetime.datetime] = {}


def _start(c: EntryContext) -> Any:
    if c.start is None:
        c.start = _start_of(c.common)
    return c.start


def _elapsed(c: EntryContext) -> Any:
    return _elapsed_of(c.common)


def _elapsed_of(common: Any) -> Any:
    d = common.duration  # an unset one reads as zero: asked whether it is set only then
    seconds, nanos = d.seconds, d.nanos
    if seconds or nanos or common.HasField("duration"):
        return _timedelta(0, seconds, nanos // 1000)
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


def _function(code: str) -> Callable[[Any], Any]:
    """``code``'s read as a function of its message."""
    function: Callable[[Any], Any] = eval(  # the constants above, never configuration
        f"lambda m: {code.format('m')}", {"parse_ip": parse_ip, "_san": _san, "ABSENT": ABSENT}
    )
    return function


_ip, _peer_of, _local_of = _function(_IP), _function(_PEER), _function(_LOCAL)
_protocol_of, _grpc_status_of = _function(_PROTOCOL), _function(_GRPC_STATUS)


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
    return _flags_of(c.common)


def _flags_of(common: Any) -> str:
    # ListFields() names only the flags that are set, in C: most entries have none.
    fields = common.response_flags.ListFields()
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
    return _url_path_of(c.entry.request.path)


def _url_path_of(path: str) -> Any:
    return path.split("?", 1)[0] if path else ABSENT


def _host(c: EntryContext) -> Any:
    return _host_of(c.entry.request.authority)


@functools.lru_cache(maxsize=4096)  # the same few authorities, entry after entry
def _host_of(authority: str) -> Any:
    if not authority:
        return ABSENT
    if authority.startswith("["):  # [v6]:port
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


@functools.lru_cache(maxsize=4096)
def _service_name(host: Any) -> Any:
    """reviews.shop.svc.cluster.local -> reviews; an address names no service."""
    if host is ABSENT or parse_ip(host.strip("[]")) is not ABSENT:
        return ABSENT
    return host.split(".", 1)[0]


def _protocol(c: EntryContext) -> Any:
    return _protocol_of(c.entry.request)


def _grpc_status(c: EntryContext) -> Any:
    return _grpc_status_of(c.entry.response)


def _response_code(c: EntryContext) -> Any:
    response = c.entry.response
    return response.response_code.value if response.HasField("response_code") else ABSENT


def _request_headers(c: EntryContext) -> dict[str, str]:
    return _headers_of(c.entry.request)


def _map(logged: Any) -> dict[str, str]:
    # A comprehension copies a protobuf map twice as fast as dict() does.
    return {name: logged[name] for name in logged}


def _headers_of(request: Any) -> dict[str, str]:
    headers = _map(request.request_headers)
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


# The request fields Envoy logs on their own, which _headers_of also shows as headers.
_HEADER_FIELDS: Mapping[str, str] = {
    ":authority": "authority", ":path": "path", "user-agent": "user_agent", "referer": "referer",
    "x-request-id": "request_id", "x-forwarded-for": "forwarded_for",
}  # fmt: skip


def request_header(request: Any, name: str, default: Any) -> Any:
    """``_headers_of(request).get(name, default)``, without building the headers."""
    value = request.request_headers.get(name)
    if value is not None:
        return value
    field = _HEADER_FIELDS.get(name)
    if field is not None:
        return getattr(request, field) or default
    if name == ":method" and request.request_method:
        return _METHODS.get(request.request_method, "")
    return default


def request_header_present(name: str, out: str) -> str | None:
    """``((out := request_header(request, name, _M)) is not _M)`` as code over the locals
    ``request`` and ``request_headers``, without the call (an access log reads several headers
    of every entry); None for ``:method``, which only the call reads."""
    if name == ":method":
        return None
    own = f"(({out} := {_map_get('request_headers', name, '_M')}) is not _M)"
    field = _HEADER_FIELDS.get(name)
    if field is None:
        return own
    return f"({own} or (({out} := request.{field} or _M) is not _M))"


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
    "response.headers": lambda c: _map(c.entry.response.response_headers),
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
