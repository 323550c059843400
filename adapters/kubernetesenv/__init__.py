"""kubernetesenv: the pods at both ends of a request, as workload attributes (Mixer's
kubernetesenv adapter, for the kubernetes attribute-generating template).

There is no Kubernetes API here: the pods it resolves are the configuration's WorkloadEntries
(address = pod IP, name = pod name, namespace, labels, serviceAccount). A pod is looked up by its
uid (``kubernetes://<name>.<namespace>``) or, failing that, by its IP.
"""

from mixerhub.adapter import AdapterInfo

from .config import KubernetesEnvParams, validate
from .handler import KubernetesEnvHandler, Pod, build

INFO = AdapterInfo(
    name="kubernetesenv",
    description="Produces workload attributes of the pods at both ends of a request",
    templates=("kubernetes",),
    params=KubernetesEnvParams,
    build=build,
    validate=validate,
    reads_workloads=True,
)

__all__ = ["INFO", "KubernetesEnvHandler", "KubernetesEnvParams", "Pod"]
