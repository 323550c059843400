"""SDS: each proxy's certificate (``default``) and the trust bundle (``ROOTCA``), Istio's names.

A proxy's identity is its SPIFFE ID, ``spiffe://<trust-domain>/ns/<namespace>/sa/<service
account>``, from its node metadata. Certificates come from the hub's CA (mixerhub.ca) and are
kept per workload (namespace, workload, service account): the replicas of one workload, which
share every other resource, share the certificate too, so a push costs one signature per
workload rather than one per proxy. Each certificate is renewed at half its lifetime with a
little jitter (Istio's default grace period), and the renewal is pushed before it expires; the
trust bundle is re-read on every renewal and push, so roots added for a rotation reach every
proxy with the next push.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message
from prometheus_client import Counter

from mixerhub.ca.authority import Authority, IssuedCertificate
from mixerhub.ca.identity import IdentityError, SpiffeId
from mixerhub.ca.keys import KeyType
from mixerhub.monitoring import REGISTRY
from mixerhub.xds.proxy import Proxy

log = logging.getLogger("mixerhub.xds")

CERTIFICATE = "default"
TRUST_BUNDLE = "ROOTCA"
# Renewal at half the lifetime, spread by up to this fraction of the lifetime so that the
# certificates of many workloads issued together are not all renewed in the same instant.
_JITTER = 0.05

ISSUED = Counter(
    "mixerhub_sds_certificates_issued",
    "Workload certificates issued for SDS, by reason (new, renewal).",
    ["reason"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class WorkloadSecrets:
    """One workload's SDS resources; a new object whenever the certificate or bundle changes."""

    certificate: IssuedCertificate
    trust_bundle: str
    resources: dict[str, Message]


class SecretIssuer:
    """Issues, caches and renews the workload certificates SDS serves.

    ``on_renewal`` is called (on the event loop) when certificates were renewed, so the caller
    pushes them; it must be cheap when nothing else changed.
    """

    def __init__(
        self,
        authority: Authority,
        *,
        ttl: datetime.timedelta | None = None,
        key_type: KeyType = KeyType.ECDSA_P256,
        on_renewal: Callable[[], None] = lambda: None,
    ) -> None:
        self.authority = authority
        self.ttl = ttl
        self.key_type = key_type
        self.on_renewal = on_renewal
        self._issued: dict[Hashable, WorkloadSecrets] = {}
        self._timer: asyncio.TimerHandle | None = None

    def identity(self, proxy: Proxy) -> SpiffeId:
        return SpiffeId(self.authority.trust_domain, proxy.namespace, proxy.service_account)

    def secrets(self, key: Hashable, proxy: Proxy) -> WorkloadSecrets | None:
        """The workload's secrets, issued now if it has none yet; None if its identity is not a
        valid SPIFFE ID (its metadata comes from the network)."""
        current = self._issued.get(key)
        bundle = self.authority.trust_bundle()
        if current is not None and current.trust_bundle != bundle:
            current = self._issued[key] = _secrets(current.certificate, bundle)
        if current is not None:
            return current
        try:
            identity = self.identity(proxy)
        except IdentityError as e:
            log.warning("%s: no certificate: %s", proxy.node_id, e)
            return None
        # ECDSA P-256 signs in well under a millisecond, so this stays on the loop; RSA keys
        # take tens of milliseconds to make and are only for operators who ask for them.
        certificate = self.authority.issue(identity, ttl=self.ttl, key_type=self.key_type)
        ISSUED.labels("new").inc()
        current = self._issued[key] = _secrets(certificate, bundle)
        self._schedule()
        return current

    def forget(self, keep: set[Hashable]) -> None:
        """Drop the certificates of workloads no longer connected."""
        for key in [k for k in self._issued if k not in keep]:
            del self._issued[key]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _renew_at(self, certificate: IssuedCertificate) -> datetime.datetime:
        lifetime = certificate.not_after - certificate.issued_at
        return certificate.renew_at + lifetime * random.uniform(0, _JITTER)

    def _schedule(self) -> None:
        """One timer, for the earliest renewal due."""
        if not self._issued:
            return
        due = min(self._renew_at(s.certificate) for s in self._issued.values())
        delay = max(0.0, (due - datetime.datetime.now(datetime.UTC)).total_seconds())
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._renew)

    def _renew(self) -> None:
        self._timer = None
        now = datetime.datetime.now(datetime.UTC)
        bundle = self.authority.trust_bundle()
        renewed = 0
        for key, current in list(self._issued.items()):
            if current.certificate.renew_at <= now:
                try:
                    certificate = self.authority.issue(
                        current.certificate.identity, ttl=self.ttl, key_type=self.key_type
                    )
                except Exception:  # the CA failing must not stop the other renewals
                    log.exception("renewing %s failed", current.certificate.identity)
                    continue
                self._issued[key] = _secrets(certificate, bundle)
                renewed += 1
        if renewed:
            ISSUED.labels("renewal").inc(renewed)
            log.info("renewed %d workload certificates", renewed)
            self.on_renewal()
        self._schedule()


def _secrets(certificate: IssuedCertificate, bundle: str) -> WorkloadSecrets:
    default = secret_pb2.Secret(name=CERTIFICATE)
    default.tls_certificate.certificate_chain.inline_bytes = certificate.cert_chain_pem.encode()
    default.tls_certificate.private_key.inline_bytes = certificate.private_key_pem.encode()
    root = secret_pb2.Secret(name=TRUST_BUNDLE)
    root.validation_context.trusted_ca.inline_bytes = bundle.encode()
    return WorkloadSecrets(certificate, bundle, {CERTIFICATE: default, TRUST_BUNDLE: root})
