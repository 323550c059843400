"""A static Envoy v3 bootstrap that puts the hub in Envoy's request path.

Envoy fronts one upstream service and calls the hub, over the hub's single gRPC port, three ways:
``envoy.filters.http.ext_authz`` (Check), ``envoy.filters.http.ratelimit`` (ShouldRateLimit) and the
``envoy.access_loggers.http_grpc`` access logger (StreamAccessLogs). The workload Envoy stands in
for is described twice: in the node metadata, with the keys Istio's proxies send (NAMESPACE,
WORKLOAD_NAME, LABELS, SERVICE_ACCOUNT), and in each ext_authz / rate-limit call's gRPC initial
metadata, because Check and ShouldRateLimit requests do not carry the node.

With ``protocol="tcp"`` (``mixerhub bootstrap --tcp``) the listener is an
``envoy.filters.network.tcp_proxy`` to the upstream instead, with no ext_authz or rate limits: Envoy
streams one ``envoy.access_loggers.tcp_grpc`` entry per connection, when it closes, to the hub,
which turns it into Istio's ``istio_tcp_*`` metrics. The node metadata is the same either way.

Field names follow the v3 protos (``envoy.config.bootstrap.v3.Bootstrap`` and the typed configs
named by each ``@type``); ``envoy --mode validate`` accepts the output.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import yaml

from mixerhub.hub_filters import (
    ACCESS_LOG_NAME,
    HUB_CLUSTER,
    LABELS_HEADER,
    LOGGED_HEADERS,
    NAMESPACE_HEADER,
    SERVICE_ACCOUNT_HEADER,
    TRACE_HEADERS,
    WORKLOAD_HEADER,
    ext_authz_filter,
    http_access_log,
    identity_metadata,
    labels_header,
    ratelimit_filter,
    router_filter,
    tcp_access_log,
    workload_rate_limits,
)

# Re-exported: these were defined here before the filters were shared with the xDS translation.
__all__ = [
    "ACCESS_LOG_NAME",
    "HUB_CLUSTER",
    "LABELS_HEADER",
    "LOGGED_HEADERS",
    "NAMESPACE_HEADER",
    "SERVICE_ACCOUNT_HEADER",
    "STAT_PREFIX",
    "TRACE_HEADERS",
    "UPSTREAM_CLUSTER",
    "WORKLOAD_HEADER",
    "AdsOptions",
    "BootstrapOptions",
    "Workload",
    "add_arguments",
    "ads_bootstrap",
    "ads_options_from_args",
    "options_from_args",
    "parse_endpoint",
    "parse_labels",
    "parse_port",
    "parse_ratelimit_headers",
    "render_ads_yaml",
    "render_yaml",
    "static_bootstrap",
]

UPSTREAM_CLUSTER = "upstream"
STAT_PREFIX = "inbound"

_TYPE = "type.googleapis.com/"
_HCM_TYPE = (
    _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_HTTP_OPTIONS_TYPE = _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TCP_PROXY_TYPE = _TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

# What Envoy's listener speaks: "http" (the HTTP connection manager with ext_authz, rate limits
# and the HTTP access log) or "tcp" (a plain TCP proxy with the TCP access log).
ListenerProtocol = Literal["http", "tcp"]
LISTENER_PROTOCOLS: tuple[ListenerProtocol, ...] = get_args(ListenerProtocol)

# Label keys and values go into one header value, "k=v,k2=v2": the separators cannot appear in
# them, nor can anything a header value may not hold.
_LABEL_PART = re.compile(r"[^,=\s\x00-\x1f\x7f]+")
# DNS-1123-ish names, plus "_" and "." which Envoy and Istio tolerate in node ids and headers.
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_MAX_PORT = 65535
_HEADER_NAME = re.compile(r":?[!#$%&'*+.^_`|~0-9a-z-]+")

_T = TypeVar("_T")


@dataclass(frozen=True)
class Workload:
    """The workload Envoy stands in for, in Istio's terms."""

    name: str = "unknown"
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"

    def __post_init__(self) -> None:
        _check_name("workload.name", self.name)
        _check_name("workload.namespace", self.namespace)
        _check_name("workload.service_account", self.service_account)
        for key, value in self.labels.items():
            _check_label("workload.labels", key, value)

    @property
    def labels_header(self) -> str:
        """The labels as one header value: ``k=v,k2=v2``, sorted by key."""
        return labels_header(self.labels)


@dataclass(frozen=True)
class BootstrapOptions:
    """Everything :func:`static_bootstrap` needs; ports are loopback TCP ports."""

    upstream: tuple[str, int]
    listen_port: int = 10000
    admin_port: int = 15000  # Istio's proxy admin port
    hub: tuple[str, int] = ("127.0.0.1", 9091)
    workload: Workload = field(default_factory=Workload)
    node_id: str | None = None
    ratelimit_domain: str = "mixerhub"
    listen_address: str = "127.0.0.1"
    protocol: ListenerProtocol = "http"
    # (request header, descriptor key): one more rate-limit descriptor each, [workload, header].
    ratelimit_headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_port("listen_port", self.listen_port)
        _check_port("admin_port", self.admin_port)
        _check_endpoint("upstream", self.upstream)
        _check_endpoint("hub", self.hub)
        _check_ip("listen_address", self.listen_address)
        if not self.ratelimit_domain:
            raise ValueError("ratelimit_domain: must not be empty")
        if self.node_id is not None and not self.node_id:
            raise ValueError("node_id: must not be empty (leave it unset for the default)")
        if self.protocol not in LISTENER_PROTOCOLS:
            raise ValueError(
                f"protocol: {self.protocol!r} is not one of {', '.join(LISTENER_PROTOCOLS)}"
            )
        _check_ratelimit_headers("ratelimit_headers", self.ratelimit_headers)

    @property
    def resolved_node_id(self) -> str:
        return _node_id(self.node_id, self.workload)


def static_bootstrap(options: BootstrapOptions) -> dict[str, Any]:
    """The complete Envoy bootstrap as plain data (JSON/YAML-ready)."""
    return {
        "node": _node(options.resolved_node_id, options.workload),
        "admin": {"address": _socket_address("127.0.0.1", options.admin_port)},
        "static_resources": {
            "listeners": [_listener(options)],
            "clusters": [
                _cluster(HUB_CLUSTER, options.hub, http2=True),
                _cluster(UPSTREAM_CLUSTER, options.upstream, http2=False),
            ],
        },
    }


def render_yaml(options: BootstrapOptions) -> str:
    """The bootstrap as YAML, for ``envoy -c``."""
    return yaml.safe_dump(static_bootstrap(options), sort_keys=False)


@dataclass(frozen=True)
class AdsOptions:
    """`mixerhub bootstrap --ads`: Envoy gets everything but the hub's address over ADS."""

    workload: Workload = field(default_factory=Workload)
    hub: tuple[str, int] = ("127.0.0.1", 9091)
    admin_port: int = 15000
    node_id: str | None = None
    delta: bool = False  # incremental xDS (DELTA_GRPC) rather than state of the world

    def __post_init__(self) -> None:
        _check_port("admin_port", self.admin_port)
        _check_endpoint("hub", self.hub)
        if self.node_id is not None and not self.node_id:
            raise ValueError("node_id: must not be empty (leave it unset for the default)")

    @property
    def resolved_node_id(self) -> str:
        return _node_id(self.node_id, self.workload)


def ads_bootstrap(options: AdsOptions) -> dict[str, Any]:
    """The node, the admin port and the hub's cluster; listeners and clusters come over ADS.

    The one static cluster carries ADS and the calls of the hub's own filters (ext_authz, rate
    limits, access logs), which the translated listeners name HUB_CLUSTER too. The node's
    metadata is how the hub knows which workload's configuration to send.
    """

    def ads() -> dict[str, Any]:  # one object per use: YAML would alias a shared one
        return {"ads": {}, "resource_api_version": "V3"}

    return {
        "node": _node(options.resolved_node_id, options.workload),
        "admin": {"address": _socket_address("127.0.0.1", options.admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if options.delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": HUB_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads(),
            "lds_config": ads(),
        },
        "static_resources": {"clusters": [_cluster(HUB_CLUSTER, options.hub, http2=True)]},
    }


def render_ads_yaml(options: AdsOptions) -> str:
    return yaml.safe_dump(ads_bootstrap(options), sort_keys=False)


def _node(node_id: str, workload: Workload) -> dict[str, Any]:
    return {
        "id": node_id,
        "cluster": workload.name,
        # The keys istio-agent puts in a sidecar's node metadata.
        "metadata": {
            "NAMESPACE": workload.namespace,
            "WORKLOAD_NAME": workload.name,
            "LABELS": dict(sorted(workload.labels.items())),
            "SERVICE_ACCOUNT": workload.service_account,
        },
    }


def _node_id(node_id: str | None, w: Workload) -> str:
    """The node id Envoy reports; by default in the shape of an Istio sidecar's."""
    if node_id is not None:
        return node_id
    return f"sidecar~127.0.0.1~{w.name}.{w.namespace}~{w.namespace}.svc.cluster.local"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mixerhub bootstrap`` flags; :func:`options_from_args` reads them back."""
    defaults = BootstrapOptions(upstream=("127.0.0.1", 8080))
    parser.add_argument(
        "--ads",
        action="store_true",
        help="a bootstrap that gets listeners, routes, clusters and endpoints from the hub's"
        " xDS (ADS); without it, a static configuration fronting --upstream",
    )
    parser.add_argument(
        "--delta", action="store_true", help="with --ads: incremental xDS (DELTA_GRPC)"
    )
    parser.add_argument(
        "--upstream", metavar="HOST:PORT", help="the service Envoy fronts (required without --ads)"
    )
    parser.add_argument(
        "--listen",
        default=str(defaults.listen_port),
        metavar="PORT",
        help=f"Envoy's HTTP listener port (default {defaults.listen_port})",
    )
    parser.add_argument(
        "--listen-address",
        default=defaults.listen_address,
        metavar="IP",
        help=f"Envoy's HTTP listener address (default {defaults.listen_address})",
    )
    parser.add_argument(
        "--admin-port",
        default=str(defaults.admin_port),
        metavar="PORT",
        help=f"Envoy's admin port on 127.0.0.1 (default {defaults.admin_port})",
    )
    parser.add_argument(
        "--hub",
        default=_format_endpoint(defaults.hub),
        metavar="HOST:PORT",
        help=f"the hub's gRPC address (default {_format_endpoint(defaults.hub)})",
    )
    parser.add_argument("--workload", default=defaults.workload.name, metavar="NAME")
    parser.add_argument("--namespace", default=defaults.workload.namespace, metavar="NS")
    parser.add_argument("--labels", default="", metavar="k=v,k2=v2")
    parser.add_argument(
        "--service-account", default=defaults.workload.service_account, metavar="SA"
    )
    parser.add_argument(
        "--node-id",
        default=None,
        metavar="ID",
        help="default: sidecar~127.0.0.1~NAME.NS~NS.svc.cluster.local",
    )
    parser.add_argument("--ratelimit-domain", default=defaults.ratelimit_domain, metavar="DOMAIN")
    parser.add_argument(
        "--ratelimit-header",
        action="append",
        default=[],
        metavar="HEADER=KEY",
        help="also rate-limit per value of a request header, as the descriptor"
        " [workload, KEY=value] (repeatable; Envoy skips it when the header is absent)",
    )
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="proxy plain TCP (envoy.filters.network.tcp_proxy, TCP access log to the hub)"
        " instead of HTTP with ext_authz and rate limits",
    )


def options_from_args(args: argparse.Namespace) -> BootstrapOptions:
    """Options from :func:`add_arguments`' flags; a bad value raises ValueError naming the flag."""
    if args.upstream is None:
        raise ValueError("--upstream: required (or --ads for a bootstrap over xDS)")
    return BootstrapOptions(
        upstream=_with_flag("--upstream", lambda: parse_endpoint(args.upstream)),
        listen_port=_with_flag("--listen", lambda: parse_port(args.listen)),
        listen_address=_with_flag("--listen-address", lambda: _check_ip("", args.listen_address)),
        admin_port=_with_flag("--admin-port", lambda: parse_port(args.admin_port)),
        hub=_with_flag("--hub", lambda: parse_endpoint(args.hub)),
        workload=_workload_from_args(args),
        node_id=_node_id_from_args(args),
        ratelimit_domain=_with_flag(
            "--ratelimit-domain", lambda: _non_empty(args.ratelimit_domain)
        ),
        protocol="tcp" if args.tcp else "http",
        ratelimit_headers=_with_flag(
            "--ratelimit-header", lambda: parse_ratelimit_headers(args.ratelimit_header)
        ),
    )


def ads_options_from_args(args: argparse.Namespace) -> AdsOptions:
    """`--ads`: the flags that matter without a static listener; others are refused."""
    static_only = [
        flag
        for flag, used in (
            ("--upstream", args.upstream is not None),
            ("--tcp", args.tcp),
            ("--ratelimit-header", bool(args.ratelimit_header)),
        )
        if used
    ]
    if static_only:
        raise ValueError(
            f"{', '.join(static_only)}: not with --ads (the hub's xDS configures the listeners)"
        )
    return AdsOptions(
        workload=_workload_from_args(args),
        hub=_with_flag("--hub", lambda: parse_endpoint(args.hub)),
        admin_port=_with_flag("--admin-port", lambda: parse_port(args.admin_port)),
        node_id=_node_id_from_args(args),
        delta=args.delta,
    )


def _node_id_from_args(args: argparse.Namespace) -> str | None:
    if args.node_id is None:
        return None
    return _with_flag("--node-id", lambda: _non_empty(args.node_id))


def _workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(
        name=_with_flag("--workload", lambda: _check_name("", args.workload)),
        namespace=_with_flag("--namespace", lambda: _check_name("", args.namespace)),
        labels=_with_flag("--labels", lambda: parse_labels(args.labels)),
        service_account=_with_flag(
            "--service-account", lambda: _check_name("", args.service_account)
        ),
    )


def parse_port(text: str | int) -> int:
    """A TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    _check_port("", port)
    return port


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` to (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    endpoint = (host, parse_port(port))
    _check_endpoint("", endpoint)
    return endpoint


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` to a dict; an empty string is no labels."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"label {item!r} is not key=value")
        if key in labels:
            raise ValueError(f"label {key!r} is given twice")
        _check_label("", key, value)
        labels[key] = value
    return labels


def parse_ratelimit_headers(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``HEADER=KEY`` items to (header, descriptor key) pairs; header names are lower-cased."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        header, sep, key = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not HEADER=KEY")
        pairs.append((header.strip().lower(), key.strip()))
    _check_ratelimit_headers("", pairs)
    return tuple(pairs)


def _listener(options: BootstrapOptions) -> dict[str, Any]:
    if options.protocol == "tcp":
        return _tcp_listener(options)
    workload = options.workload
    identity = _identity_metadata(workload)
    route = {
        "cluster": UPSTREAM_CLUSTER,
        "rate_limits": [
            *workload_rate_limits(workload.name),
            # Per request header, [workload, header]: Envoy's request_headers action drops the
            # whole descriptor when the header is absent (skip_if_absent is false).
            *(
                {
                    "actions": [
                        # The workload-alone descriptor's entry, a fresh copy: shared objects
                        # would become YAML aliases.
                        workload_rate_limits(workload.name)[0]["actions"][0],
                        {"request_headers": {"header_name": header, "descriptor_key": key}},
                    ]
                }
                for header, key in options.ratelimit_headers
            ),
        ],
    }
    hcm = {
        "@type": _HCM_TYPE,
        "stat_prefix": STAT_PREFIX,
        "codec_type": "AUTO",
        "generate_request_id": True,
        # The peer's own address, not X-Forwarded-For, is what remote_address descriptors see, so
        # a client cannot dodge a per-address limit by sending the header.
        "use_remote_address": True,
        # Istio's default path normalization (BASE, RFC 3986): policies, routes and the upstream
        # all see /a/../b as /b, so a DENY on a path cannot be dodged with dot segments.
        "normalize_path": True,
        "route_config": {
            "name": "inbound",
            "virtual_hosts": [
                {
                    "name": workload.name,
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": route},
                    ],
                },
            ],
        },
        "http_filters": [
            ext_authz_filter(identity),
            ratelimit_filter(options.ratelimit_domain, identity),
            router_filter(),
        ],
        "access_log": [http_access_log()],
    }
    return {
        "name": "inbound",
        "address": _socket_address(options.listen_address, options.listen_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            },
        ],
    }


def _tcp_listener(options: BootstrapOptions) -> dict[str, Any]:
    """A TCP proxy to the upstream; each connection is logged to the hub when it closes."""
    tcp_proxy = {
        "@type": _TCP_PROXY_TYPE,
        "stat_prefix": STAT_PREFIX,
        "cluster": UPSTREAM_CLUSTER,
        "access_log": [tcp_access_log()],
    }
    return {
        "name": "inbound",
        "address": _socket_address(options.listen_address, options.listen_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]},
        ],
    }


def _identity_metadata(workload: Workload) -> list[dict[str, str]]:
    return identity_metadata(
        workload.name, workload.namespace, workload.labels, workload.service_account
    )


def _cluster(name: str, endpoint: tuple[str, int], *, http2: bool) -> dict[str, Any]:
    host, port = endpoint
    cluster: dict[str, Any] = {"name": name}
    if _is_ip(host):
        cluster["type"] = "STATIC"
    else:
        cluster["type"] = "STRICT_DNS"
        # "localhost" resolves to ::1 first, while local services often listen on IPv4 only.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster |= {
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _at(what: str) -> str:
    """The field path that starts an error message, when there is one."""
    return f"{what}: " if what else ""


def _check_port(what: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= _MAX_PORT:
        raise ValueError(f"{_at(what)}{port!r} is out of range (a port is 1 to {_MAX_PORT})")


def _check_ip(what: str, address: str) -> str:
    if not _is_ip(address):
        raise ValueError(f"{_at(what)}{address!r} is not an IP address")
    return address


def _check_endpoint(what: str, endpoint: tuple[str, int]) -> None:
    host, port = endpoint
    if not _is_ip(host) and not _NAME.fullmatch(host):
        raise ValueError(f"{_at(what)}{host!r} is neither an IP address nor a host name")
    _check_port(f"{what} port" if what else "", port)


def _format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_name(what: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{_at(what)}{value!r} is not a valid name (letters, digits, '.', '_' and '-',"
            " starting and ending with a letter or digit)"
        )
    return value


def _check_label(what: str, key: str, value: str) -> None:
    if not _LABEL_PART.fullmatch(key) or not _LABEL_PART.fullmatch(value):
        raise ValueError(
            f"{_at(what)}{key!r}={value!r} is not a valid label (key and value non-empty, without"
            " ',', '=', spaces or control characters)"
        )


def _check_ratelimit_headers(what: str, pairs: Sequence[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for header, key in pairs:
        # An HTTP field name (RFC 9110 token), or a pseudo-header such as :path or :authority.
        if not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"{_at(what)}{header!r} is not a lower-case request header name")
        if header in seen:
            raise ValueError(f"{_at(what)}header {header!r} is given twice")
        seen.add(header)
        if not _LABEL_PART.fullmatch(key):
            raise ValueError(
                f"{_at(what)}descriptor key {key!r} for {header!r} must be non-empty, without"
                " ',', '=', spaces or control characters"
            )


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _with_flag(flag: str, build: Callable[[], _T]) -> _T:
    try:
        return build()
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
