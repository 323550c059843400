"""Workload identities: SPIFFE IDs of the form ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

The form is Istio's (pkg/spiffe); the character rules are the SPIFFE ID specification's (a
lowercase trust domain of letters, digits, dots, dashes and underscores; path segments of
letters, digits, dots, dashes and underscores, never ``.`` or ``..``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,253}")


class IdentityError(ValueError):
    """A SPIFFE ID or one of its parts is not acceptable."""


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(value):
        raise IdentityError(
            f"invalid trust domain {value!r}: lowercase letters, digits, '.', '-' and '_' only"
        )
    return value


def _check_segment(what: str, value: str) -> str:
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise IdentityError(f"invalid {what} {value!r}: letters, digits, '.', '-' and '_' only")
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals and Envoy's source.principal use."""
        return self.uri.removeprefix("spiffe://")

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Read a workload SPIFFE ID; anything but the ``/ns/<ns>/sa/<sa>`` form is refused."""
        if not uri.startswith("spiffe://"):
            raise IdentityError(f"{uri!r} is not a SPIFFE ID (spiffe://...)")
        trust_domain, _, path = uri.removeprefix("spiffe://").partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(
                f"{uri!r} is not a workload identity (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"
            )
        return cls(trust_domain, parts[1], parts[3])
