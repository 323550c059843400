"""Route configurations (RDS) of the outbound listeners: VirtualServices as Envoy routes.

An egress listener's route configuration has a virtual host per reachable service and HTTP
port. Its domains are ``HOST:PORT`` and, for the service's primary port (the one numbered like
the listener, else its lowest HTTP port), the bare ``HOST``: clients send the service's Host
header to their own Envoy's egress port, whatever that port's number. Hosts under
``svc.cluster.local`` also answer to Istio's short names (``name.ns.svc``, ``name.ns``, and
``name`` from the same namespace). A domain already taken by an earlier virtual host is left
out, since Envoy rejects duplicates.

Routes follow Istio's route translation (pilot/pkg/networking/core/route): one Envoy route per
match; weighted clusters; ``rewrite.uri`` as prefix_rewrite (regex_rewrite when the match is a
regex); timeouts disabled unless set; Istio's default retry policy unless ``retries`` says
otherwise; faults as per-route config of envoy.filters.http.fault. A service without a
VirtualService gets one catch-all route to its cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from mixerhub.networking.registry import Networking, Service
from mixerhub.networking.service_entry import ServicePort
from mixerhub.networking.validation import DNS_SUFFIX, Percent, duration_json, is_http
from mixerhub.networking.virtual_service import (
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    RouteDestination,
    StringMatch,
    applies_to,
)
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.translate import names

FAULT: Final = "envoy.filters.http.fault"
FAULT_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
_PREVIOUS_HOSTS: Final = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)
# Istio's default retry policy (networking/core/route/retry): two retries of failures that
# happened before the upstream saw the request, and of 503.
DEFAULT_RETRY_ON: Final = (
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
)


def retry_policy(retries: HTTPRetry | None) -> dict[str, Any] | None:
    if retries is not None and retries.attempts == 0:
        return None
    policy: dict[str, Any] = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": 2,
        "retriable_status_codes": [503],
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": _PREVIOUS_HOSTS},
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    if retries is None:
        return policy
    policy["num_retries"] = retries.attempts
    if retries.per_try_timeout is not None:
        policy["per_try_timeout"] = duration_json(retries.per_try_timeout)
    if retries.retry_on:
        parts = [p.strip() for p in retries.retry_on.split(",") if p.strip()]
        codes = [int(p) for p in parts if p.isdigit()]
        on = [p for p in parts if not p.isdigit()]
        if codes and "retriable-status-codes" not in on:
            on.append("retriable-status-codes")
        policy["retry_on"] = ",".join(on)
        if codes:
            policy["retriable_status_codes"] = codes
        else:
            del policy["retriable_status_codes"]
    return policy


def _string_match(m: StringMatch) -> dict[str, Any] | None:
    if m.exact is not None:
        return {"exact": m.exact}
    if m.prefix is not None:
        return {"prefix": m.prefix}
    if m.regex is not None:
        return {"safe_regex": {"regex": m.regex}}
    return None


def _header_matcher(name: str, m: StringMatch, invert: bool = False) -> dict[str, Any]:
    matcher: dict[str, Any] = {"name": name}
    string_match = _string_match(m)
    if string_match is None:
        matcher["present_match"] = True  # Istio: an empty match is a presence check
    else:
        matcher["string_match"] = string_match
    if invert:
        matcher["invert_match"] = True
    return matcher


def route_match(m: HTTPMatchRequest | None) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": "/"}
    if m is None:
        return match
    if m.uri is not None:
        if m.uri.exact is not None:
            match = {"path": m.uri.exact}
        elif m.uri.prefix is not None:
            match = {"prefix": m.uri.prefix}
        elif m.uri.regex is not None:
            match = {"safe_regex": {"regex": m.uri.regex}}
    if m.ignore_uri_case:
        match["case_sensitive"] = False
    headers = [_header_matcher(name, sm) for name, sm in sorted(m.headers.items())]
    for pseudo, sm in ((":method", m.method), (":authority", m.authority), (":scheme", m.scheme)):
        if sm is not None:
            headers.append(_header_matcher(pseudo, sm))
    headers += [_header_matcher(n, sm, invert=True) for n, sm in sorted(m.without_headers.items())]
    if headers:
        match["headers"] = headers
    params = []
    for name, sm in sorted(m.query_params.items()):
        string_match = _string_match(sm)
        params.append(
            {"name": name, "present_match": True}
            if string_match is None
            else {"name": name, "string_match": string_match}
        )
    if params:
        match["query_parameters"] = params
    return match


def _header_ops(ops: HeaderOperations | None) -> tuple[list[dict[str, Any]], list[str]]:
    if ops is None:
        return [], []
    add = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in ops.set.items()
    ]
    add += [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in ops.add.items()
    ]
    return add, list(ops.remove)


def _apply_headers(target: dict[str, Any], headers: Headers | None) -> None:
    if headers is None:
        return
    for side, ops in (("request", headers.request), ("response", headers.response)):
        add, remove = _header_ops(ops)
        if add:
            target[f"{side}_headers_to_add"] = add
        if remove:
            target[f"{side}_headers_to_remove"] = remove


def _percentage(percent: Percent | None, legacy: int | None = None) -> dict[str, Any]:
    # Istio: no percentage at all means every request.
    value = percent.value if percent is not None else 100.0 if legacy is None else float(legacy)
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def fault_config(fault: HTTPFaultInjection) -> dict[str, Any]:
    config: dict[str, Any] = {"@type": FAULT_TYPE}
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        config["delay"] = {
            "fixed_delay": duration_json(fault.delay.fixed_delay),
            "percentage": _percentage(fault.delay.percentage, fault.delay.percent),
        }
    if fault.abort is not None and fault.abort.http_status is not None:
        config["abort"] = {
            "http_status": fault.abort.http_status,
            "percentage": _percentage(fault.abort.percentage),
        }
    return config


class RouteBuilder:
    """Builds the route configuration of one egress listener for one proxy."""

    def __init__(self, proxy: Proxy, networking: Networking) -> None:
        self.proxy = proxy
        self.networking = networking
        self._services = {s.hostname: s for s in networking.services_for(proxy.namespace)}

    def _default_port(self, host: str) -> int | None:
        """The port of a destination given without one: the service's only (or first) port."""
        service = self._services.get(host)
        return service.ports[0].number if service is not None and service.ports else None

    def _cluster(self, d: RouteDestination, service: Service, port: int) -> str:
        number = d.port
        if number is None:
            number = port if d.host == service.hostname else self._default_port(d.host) or port
        return names.outbound_cluster(number, d.host, d.subset)

    def _action(
        self, route: HTTPRoute, service: Service, port: int, match: HTTPMatchRequest | None
    ) -> dict[str, Any]:
        action: dict[str, Any] = {}
        destinations = [d for d in route.destinations if d.weight > 0]
        if len(destinations) == 1:
            action["cluster"] = self._cluster(destinations[0], service, port)
        else:
            weighted = []
            for d in destinations:
                cw: dict[str, Any] = {"name": self._cluster(d, service, port), "weight": d.weight}
                _apply_headers(cw, d.headers)
                weighted.append(cw)
            action["weighted_clusters"] = {"clusters": weighted}
        rw = route.rewrite
        if rw is not None:
            if rw.uri_regex_rewrite is not None:
                action["regex_rewrite"] = {
                    "pattern": {"regex": rw.uri_regex_rewrite.match},
                    "substitution": rw.uri_regex_rewrite.rewrite,
                }
            elif rw.uri:
                if match is not None and match.uri is not None and match.uri.regex is not None:
                    action["regex_rewrite"] = {
                        "pattern": {"regex": match.uri.regex},
                        "substitution": rw.uri,
                    }
                else:
                    action["prefix_rewrite"] = rw.uri
            if rw.authority:
                action["host_rewrite_literal"] = rw.authority
        # Istio disables Envoy's default 15 s route timeout unless a timeout is given.
        action["timeout"] = duration_json(route.timeout or 0)
        retry = retry_policy(route.retries)
        if retry is not None:
            action["retry_policy"] = retry
        return action

    def routes(
        self,
        service: Service,
        port: ServicePort,
        egress_hosts: Sequence[tuple[str, str]] | None = None,
    ) -> list[dict[str, Any]]:
        vs = self.networking.virtual_service(self.proxy.namespace, service.hostname, egress_hosts)
        if vs is None:
            return [
                {
                    "name": "default",
                    "match": {"prefix": "/"},
                    "route": {
                        "cluster": names.outbound_cluster(port.number, service.hostname),
                        "timeout": "0s",
                        "retry_policy": retry_policy(None),
                    },
                }
            ]
        out: list[dict[str, Any]] = []
        for route in vs.http:
            matches: list[HTTPMatchRequest | None] = [
                m
                for m in route.matches
                if applies_to(m, self.proxy.namespace, self.proxy.labels)
                and m.port in (None, port.number)
            ]
            if not route.matches:
                matches = [None]
            elif not matches:
                continue  # no match of this route can hold for this proxy and port
            for m in matches:
                envoy_route: dict[str, Any] = {
                    "match": route_match(m),
                    "route": self._action(route, service, port.number, m),
                }
                name = (m.name if m is not None else "") or route.name
                if name:
                    envoy_route["name"] = name
                if len(route.destinations) == 1:
                    _apply_headers(envoy_route, route.destinations[0].headers)
                _apply_headers(envoy_route, route.headers)
                if route.fault is not None:
                    envoy_route["typed_per_filter_config"] = {FAULT: fault_config(route.fault)}
                out.append(envoy_route)
            if not route.matches:
                break  # Istio: nothing after a catch-all route is reachable
        return out

    def route_config(
        self,
        name: str,
        listener_port: int,
        services: list[Service],
        egress_hosts: Sequence[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """The routes of one outbound listener: a virtual host per service and port, routed by
        the VirtualService its Sidecar egress entry imports (``egress_hosts``), if any."""
        virtual_hosts = []
        used: set[str] = set()
        for service in services:
            http_ports = [p for p in service.ports if is_http(p.protocol)]
            if not http_ports:
                continue
            primary = next((p for p in http_ports if p.number == listener_port), None)
            primary = primary or min(http_ports, key=lambda p: p.number)
            for port in sorted(http_ports, key=lambda p: p.number):
                aliases = [service.hostname, *self._short_names(service.hostname)]
                domains = [f"{a}:{port.number}" for a in aliases]
                if port is primary:
                    domains = aliases + domains
                domains = [d for d in domains if d not in used]
                used.update(domains)
                if not domains:
                    continue
                virtual_hosts.append(
                    {
                        "name": names.virtual_host(service.hostname, port.number),
                        "domains": domains,
                        "routes": self.routes(service, port, egress_hosts),
                    }
                )
        # Clusters of the routes may be missing (a subset without a DestinationRule, as in
        # Istio): Envoy answers 503 for those routes rather than rejecting the whole config.
        return {"name": name, "virtual_hosts": virtual_hosts, "validate_clusters": False}

    def _short_names(self, host: str) -> list[str]:
        suffix = "." + DNS_SUFFIX
        if not host.endswith(suffix):
            return []
        parts = host[: -len(suffix)].split(".")
        if len(parts) != 2:
            return []
        name, namespace = parts
        out = [f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        if namespace == self.proxy.namespace:
            out.append(name)
        return out
