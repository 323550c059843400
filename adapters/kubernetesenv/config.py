"""kubernetesenv's params: Mixer's (mixer/adapter/kubernetesenv/config/config.proto).

They are accepted so Istio's configuration loads unchanged; with no Kubernetes API to watch,
only ``kubeconfig_path`` is checked (a path that does not exist is a mistake worth reporting).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from pathlib import Path

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.types import Duration, Params


class KubernetesEnvParams(Params):
    # Where Mixer read its kubeconfig; empty meant in-cluster configuration.
    kubeconfig_path: str = ""
    # How often Mixer resynced its pod cache (its default, 5 minutes).
    cache_refresh_duration: Duration = datetime.timedelta(minutes=5)
    # Where Mixer looked for secrets of remote clusters (multi-cluster).
    cluster_registries_namespace: str = "istio-system"


def validate(
    params: KubernetesEnvParams, instances: Mapping[str, InstanceSpec]
) -> Iterable[FieldError]:
    if params.kubeconfig_path and not Path(params.kubeconfig_path).is_file():
        yield FieldError(
            "kubeconfig_path",
            f"no such file: {params.kubeconfig_path!r} (the hub reads pods from WorkloadEntries"
            " and needs no kubeconfig; leave it empty)",
        )
