"""An ext_authz CheckRequest as Mixer attributes, each computed only when something reads it
(see mixerhub.bag): a request pays only for the attributes its rules and policies read."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from envoy.service.auth.v3 import external_auth_pb2

from mixerhub.bag import ABSENT, LazyBag, namespace_of, parse_ip, principal
from mixerhub.workload import WorkloadIdentity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Bounds on what one request may make the hub hold: hostile input is cut, not trusted.
MAX_QUERY_PARAMS = 256


class CheckContext:
    """What extractors read: the request, the calling workload and the authenticated identity."""

    __slots__ = ("headers", "http", "identity", "request", "workload")

    def __init__(
        self,
        request: external_auth_pb2.CheckRequest,
        workload: WorkloadIdentity,
        identity: Mapping[str, object] | None = None,
    ) -> None:
        self.request = request
        # Most attributes come from here: three message lookups once, not for each attribute.
        self.http = request.attributes.request.http
        self.headers = self.http.headers  # read by the key, the authenticator and extractors
        self.workload = workload
        self.identity = identity or {}


Extractor = Callable[[CheckContext], Any]


def CheckBag(context: CheckContext) -> LazyBag[CheckContext]:
    """The attributes of one Check, computed on first read."""
    return LazyBag(context, EXTRACTORS)


def _http(c: CheckContext) -> external_auth_pb2.AttributeContext.HttpRequest:
    return c.http


def _header(name: str) -> Extractor:
    def extract(c: CheckContext) -> Any:
        value = c.headers.get(name)
        return ABSENT if value is None else value

    return extract


def _path(c: CheckContext) -> Any:
    return _http(c).path or ABSENT


def _url_path(c: CheckContext) -> Any:
    path = c.http.path
    if not path:
        return ABSENT
    return path.split("?", 1)[0].split("#", 1)[0]


def _query_params(c: CheckContext) -> Any:
    path = _http(c).path
    _, _, query = path.partition("?")
    query = query.split("#", 1)[0]
    pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=None)[:MAX_QUERY_PARAMS]
    return dict(pairs)


def _protocol(c: CheckContext) -> str:
    content_type = c.headers.get("content-type", "")
    return "grpc" if content_type.startswith("application/grpc") else "http"


def _time(c: CheckContext) -> Any:
    t = c.request.attributes.request.time
    if not t.seconds and not t.nanos:
        return ABSENT
    return datetime.datetime.fromtimestamp(t.seconds + t.nanos / 1e9, datetime.UTC)


def _size(c: CheckContext) -> Any:
    size = _http(c).size
    return ABSENT if size < 0 else size


def _source_principal(c: CheckContext) -> Any:
    return principal(c.request.attributes.source.principal)


def _workload_field(get: Callable[[WorkloadIdentity], Any]) -> Extractor:
    def extract(c: CheckContext) -> Any:
        value = get(c.workload)
        return value if value else ABSENT

    return extract


def _identity(name: str) -> Extractor:
    def extract(c: CheckContext) -> Any:
        return c.identity.get(name, ABSENT)

    return extract


def _source_namespace(c: CheckContext) -> Any:
    return namespace_of(_source_principal(c))


def _mtls(c: CheckContext) -> bool:
    source = c.request.attributes.source
    return bool(source.principal or source.certificate)


def _sni(c: CheckContext) -> Any:
    return c.request.attributes.tls_session.sni or ABSENT


EXTRACTORS: Mapping[str, Extractor] = {
    "source.ip": lambda c: parse_ip(c.request.attributes.source.address.socket_address.address),
    "source.port": lambda c: c.request.attributes.source.address.socket_address.port_value,
    "source.principal": _source_principal,
    "source.user": _source_principal,
    "source.namespace": _source_namespace,
    # Envoy resolves X-Forwarded-For into the source address by its own trusted-hops setting;
    # trusting the header again here would let a client choose its own address.
    "remote.ip": lambda c: parse_ip(c.request.attributes.source.address.socket_address.address),
    "destination.ip": lambda c: parse_ip(
        c.request.attributes.destination.address.socket_address.address
    ),
    "destination.port": lambda c: (
        c.request.attributes.destination.address.socket_address.port_value
    ),
    "destination.principal": lambda c: principal(c.request.attributes.destination.principal),
    "destination.workload.name": _workload_field(lambda w: w.name),
    "destination.name": _workload_field(lambda w: w.name),
    "destination.workload.namespace": _workload_field(lambda w: w.namespace),
    "destination.namespace": _workload_field(lambda w: w.namespace),
    "destination.labels": lambda c: dict(c.workload.labels),
    "destination.workload.labels": lambda c: dict(c.workload.labels),
    "destination.serviceAccount": _workload_field(lambda w: w.service_account),
    # Envoy's header map is already a read-only Mapping (lower-case names): no copy.
    "request.headers": lambda c: c.headers,
    "request.id": lambda c: _http(c).id or c.headers.get("x-request-id", ABSENT),
    "request.method": lambda c: c.http.method or ABSENT,
    "request.path": _path,
    "request.url_path": _url_path,
    "request.query_params": _query_params,
    "request.host": lambda c: _http(c).host or ABSENT,
    "request.scheme": lambda c: _http(c).scheme or ABSENT,
    "request.fragment": lambda c: _http(c).fragment or ABSENT,
    "request.useragent": _header("user-agent"),
    "request.referer": _header("referer"),
    "request.size": _size,
    "request.total_size": _size,
    "request.time": _time,
    "context.time": _time,
    "context.protocol": _protocol,
    # ext_authz is called by the proxy in front of the destination: an inbound check.
    "context.reporter.kind": lambda c: "inbound",
    "context_extensions": lambda c: dict(c.request.attributes.context_extensions),
    "connection.mtls": _mtls,
    "connection.requested_server_name": _sni,
    "connection.sni": _sni,
    "request.auth.principal": _identity("request.auth.principal"),
    "request.auth.audiences": _identity("request.auth.audiences"),
    "request.auth.presenter": _identity("request.auth.presenter"),
    "request.auth.claims": _identity("request.auth.claims"),
    "request.auth.raw_claims": _identity("request.auth.raw_claims"),
}
