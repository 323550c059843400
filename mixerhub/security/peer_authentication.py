"""PeerAuthentication (security.istio.io v1 and v1beta1): whether a workload's inbound traffic is
mutual TLS.

The kind compiles into ``PeerAuthentications``, whose ``mode(namespace, labels, port)`` is the
effective mode of one inbound port, composed as istiod composes it
(pilot/pkg/security/authn/policy_applier.go, ComposePeerAuthentication):

- The mesh level is the policy without a selector in the root namespace (istio-system); its
  UNSET, or no such policy, is PERMISSIVE.
- The namespace level is the policy without a selector in the workload's namespace; UNSET (or
  none) inherits the mesh level.
- The workload level is the policy in the workload's namespace whose selector's labels the
  workload carries; UNSET inherits the namespace level. Its ``portLevelMtls`` entry for the port,
  unless UNSET, decides that port. A selector is only ever matched in the workload's own
  namespace: one in the root namespace selects workloads of istio-system alone.
- Where Istio takes the oldest of several policies at one level, the hub, which has no creation
  times, takes the first loaded.

``portLevelMtls`` without a selector is rejected, as Istio's validation rejects it. The port is
the one the workload's Envoy listens on: a Sidecar ``ingress`` port (Istio: the workload's port,
not the Service's).

The translation (mixerhub.xds.translate.listeners) turns the mode into inbound filter chains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mixerhub.security import ROOT_NAMESPACE
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

if TYPE_CHECKING:
    from mixerhub.store.compilation import Compilation
    from mixerhub.store.documents import Document

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")

Mode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
EffectiveMode = Literal["DISABLE", "PERMISSIVE", "STRICT"]
# Istio's default when nothing says otherwise: plaintext and mTLS both accepted.
DEFAULT_MODE: EffectiveMode = "PERMISSIVE"


# --- the spec (istio/api security/v1 peer_authentication.proto) ------------------------------


class WorkloadSelector(Params):
    match_labels: dict[str, str] = Field(default_factory=dict)


class MutualTls(Params):
    mode: Mode = "UNSET"


class PeerAuthenticationSpec(Params):
    selector: WorkloadSelector | None = None
    mtls: MutualTls | None = None
    port_level_mtls: dict[int, MutualTls] = Field(default_factory=dict)


# --- what the translation reads ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAuthenticationPolicy:
    name: str
    namespace: str
    selector: Mapping[str, str] | None  # None: the namespace's (or, in the root, the mesh's)
    mode: Mode
    ports: Mapping[int, Mode]

    def selects(self, labels: Mapping[str, str]) -> bool:
        assert self.selector is not None
        return all(labels.get(k) == v for k, v in self.selector.items())


def _inherit(mode: Mode | None, parent: EffectiveMode) -> EffectiveMode:
    return parent if mode is None or mode == "UNSET" else mode


class PeerAuthentications:
    """Every PeerAuthentication of one snapshot; ``mode`` answers per workload and port."""

    def __init__(
        self,
        policies: Iterable[PeerAuthenticationPolicy] = (),
        *,
        root_namespace: str = ROOT_NAMESPACE,
    ) -> None:
        self.policies = tuple(policies)
        self.root_namespace = root_namespace
        self._namespace_wide: dict[str, PeerAuthenticationPolicy] = {}
        self._selecting: dict[str, list[PeerAuthenticationPolicy]] = {}
        for p in self.policies:
            if p.selector is None:
                self._namespace_wide.setdefault(p.namespace, p)  # the first loaded stands
            else:
                self._selecting.setdefault(p.namespace, []).append(p)

    def policy(self, namespace: str, labels: Mapping[str, str]) -> PeerAuthenticationPolicy | None:
        """The workload-level policy: the first in the namespace whose selector matches."""
        for p in self._selecting.get(namespace, ()):
            if p.selects(labels):
                return p
        return None

    def mode(self, namespace: str, labels: Mapping[str, str], port: int) -> EffectiveMode:
        """The effective mTLS mode of a workload's inbound port."""
        mesh = self._namespace_wide.get(self.root_namespace)
        mode = _inherit(mesh.mode if mesh else None, DEFAULT_MODE)
        if namespace != self.root_namespace:
            own = self._namespace_wide.get(namespace)
            mode = _inherit(own.mode if own else None, mode)
        workload = self.policy(namespace, labels)
        if workload is not None:
            mode = _inherit(workload.mode, mode)
            mode = _inherit(workload.ports.get(port), mode)
        return mode


# --- compiling ---------------------------------------------------------------------------------


def compile_peer_authentication(
    doc: Document, spec: PeerAuthenticationSpec, c: Compilation
) -> None:
    if not c.claim("peerauthentication", doc):
        return
    selector = dict(spec.selector.match_labels) if spec.selector else {}
    failed = False
    if spec.port_level_mtls and not selector:
        # Istio's ValidatePeerAuthentication: ports are a workload's, so a workload is named.
        c.error(doc, "spec.portLevelMtls", "requires a selector with matchLabels (spec.selector)")
        failed = True
    for port in spec.port_level_mtls:
        if not 1 <= port <= 65535:
            c.error(doc, join_path("spec", "portLevelMtls", port), "port must be 1..65535")
            failed = True
    for key in selector:
        if not key:
            c.error(doc, "spec.selector.matchLabels", "label names must not be empty")
            failed = True
    if failed:
        return
    c.peer_authentications.append(
        PeerAuthenticationPolicy(
            doc.name,
            doc.namespace,
            selector or None,
            spec.mtls.mode if spec.mtls else "UNSET",
            {port: m.mode for port, m in spec.port_level_mtls.items()},
        )
    )


PEER_AUTHENTICATION = Kind(
    GROUP,
    VERSIONS,
    "PeerAuthentication",
    PeerAuthenticationSpec,
    40,
    compile_peer_authentication,
)
