"""The kubernetesenv handler: an index of the configuration's WorkloadEntries as pods."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mixerhub.adapter import Env, Handler, InstanceSpec, Workload
from mixerhub.templates import IPAddress, KubernetesInstance, KubernetesOutput

from .config import KubernetesEnvParams

_UID_PREFIX = "kubernetes://"


@dataclass(frozen=True, slots=True)
class Pod:
    """What is known of one pod, with the values the output gives for it."""

    ip: IPAddress
    name: str
    namespace: str
    labels: Mapping[str, str]
    service_account: str
    uid: str  # kubernetes://<name>.<namespace>
    workload_name: str
    workload_uid: str  # istio://<namespace>/workloads/<workload name>
    owner: str

    @classmethod
    def from_workload(cls, w: Workload, ip: IPAddress) -> Pod:
        # Istio names a workload after its controller; a WorkloadEntry has none, so its
        # app label (Istio's canonical-name fallback) or its own name stands in.
        workload = w.labels.get("app") or w.name
        return cls(
            ip,
            w.name,
            w.namespace,
            dict(w.labels),
            w.service_account,
            f"{_UID_PREFIX}{w.name}.{w.namespace}",
            workload,
            f"istio://{w.namespace}/workloads/{workload}",
            # Istio's owner for a pod without a known controller: the pod itself.
            f"{_UID_PREFIX}apis/v1/namespaces/{w.namespace}/pods/{w.name}",
        )


class KubernetesEnvHandler(Handler):
    # The pods are the configuration's WorkloadEntries, fixed for the handler's life.
    outputs_depend_on_instance_alone = True

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self._by_uid: dict[str, Pod] = {}
        self._by_ip: dict[IPAddress, Pod] = {}
        for w in workloads:
            try:
                ip = ipaddress.ip_address(w.address)
            except ValueError:
                continue  # a host name or a unix socket: no pod IP to find it by
            pod = Pod.from_workload(w, ip)
            self._by_uid.setdefault(pod.uid, pod)
            self._by_ip.setdefault(ip, pod)

    def find(self, uid: str, ip: IPAddress | None) -> Pod | None:
        """The pod with the uid (kubernetes://name.namespace), else the one with the IP."""
        pod = self._by_uid.get(uid) if uid else None
        if pod is None and ip is not None and not ip.is_unspecified:
            pod = self._by_ip.get(ip)
        return pod

    def generate_kubernetes_attributes(self, instance: KubernetesInstance) -> KubernetesOutput:
        out = KubernetesOutput()
        src = self.find(instance.source_uid, instance.source_ip)
        if src is not None:
            out.source_pod_ip = src.ip
            out.source_pod_name = src.name
            out.source_labels = dict(src.labels)
            out.source_namespace = src.namespace
            out.source_service_account_name = src.service_account
            out.source_workload_uid = src.workload_uid
            out.source_workload_name = src.workload_name
            out.source_workload_namespace = src.namespace
            out.source_owner = src.owner
            out.source_pod_uid = src.uid
        dst = self.find(instance.destination_uid, instance.destination_ip)
        if dst is not None:
            out.destination_pod_ip = dst.ip
            out.destination_pod_name = dst.name
            out.destination_labels = dict(dst.labels)
            out.destination_namespace = dst.namespace
            out.destination_service_account_name = dst.service_account
            out.destination_workload_uid = dst.workload_uid
            out.destination_workload_name = dst.workload_name
            out.destination_workload_namespace = dst.namespace
            out.destination_owner = dst.owner
            out.destination_pod_uid = dst.uid
        # host IPs and container names are not in a WorkloadEntry: left unset, the bindings'
        # defaults apply.
        return out


def build(
    params: KubernetesEnvParams, instances: Mapping[str, InstanceSpec], env: Env
) -> KubernetesEnvHandler:
    if params.kubeconfig_path:
        env.logger.info(
            "%s: kubeconfig_path is not read; pods come from WorkloadEntries", env.handler
        )
    return KubernetesEnvHandler(env.workloads)
