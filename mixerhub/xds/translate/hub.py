"""Which of the hub's filters a proxy's listeners carry: only those with something to do.

- ext_authz (Check) when the proxy's namespace has check or quota rules (its own or the mesh's,
  Mixer's rule scoping), or an AuthorizationPolicy or RequestAuthentication selects its workload.
- the ratelimit filter when the domain the proxies use (``DEFAULT_RATELIMIT_DOMAIN``, as
  `mixerhub bootstrap` uses by default) has a RateLimitConfig.
- the gRPC access loggers (Report) when the proxy's namespace has report rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixerhub.hub_filters import DEFAULT_RATELIMIT_DOMAIN
from mixerhub.security import ROOT_NAMESPACE
from mixerhub.snapshot import Snapshot
from mixerhub.templates import Variety
from mixerhub.workload import WorkloadIdentity
from mixerhub.xds.proxy import Proxy

_CHECK_TIME = frozenset({Variety.CHECK, Variety.QUOTA})


@dataclass(frozen=True)
class HubCalls:
    check: bool
    rate_limit_domain: str | None
    report: bool


def hub_calls(proxy: Proxy, snapshot: Snapshot) -> HubCalls:
    rules = [r for r in snapshot.rules if r.namespace in (ROOT_NAMESPACE, proxy.namespace)]
    identity = WorkloadIdentity(
        proxy.workload, proxy.namespace, dict(proxy.labels), proxy.service_account
    )
    check = (
        any(
            r.varieties() & _CHECK_TIME
            or r.request_header_operations
            or r.response_header_operations
            for r in rules
        )
        or snapshot.authorization.applies(identity)
        or snapshot.authenticator.applies(identity)
    )
    report = any(Variety.REPORT in r.varieties() for r in rules)
    domain = DEFAULT_RATELIMIT_DOMAIN
    configured = domain in snapshot.rate_limits.domains
    return HubCalls(check, domain if configured else None, report)
