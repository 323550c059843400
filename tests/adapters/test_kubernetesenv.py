"""kubernetesenv: pods from WorkloadEntries, looked up by uid or IP; Mixer's params."""

from __future__ import annotations

import ipaddress
import logging
import textwrap
from pathlib import Path

import pytest
from mixerhub.adapters.kubernetesenv import INFO, KubernetesEnvHandler, KubernetesEnvParams
from prometheus_client import CollectorRegistry

from mixerhub import registry
from mixerhub.adapter import Env
from mixerhub.networking.workload_entry import WorkloadEntry
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.templates import KubernetesInstance, KubernetesOutput
from tests.mesh import workload_entry

IP = ipaddress.ip_address
PRODUCTPAGE = WorkloadEntry(
    "productpage-v1-7f9", "shop", "10.0.0.9", {"http": 9080},
    {"app": "productpage", "version": "v1"}, "bookinfo-productpage",
)  # fmt: skip
DETAILS = WorkloadEntry("details-1", "shop", "10.0.0.7", labels={}, service_account="")
VM_BY_NAME = WorkloadEntry("vm", "shop", "vm.example.com")  # a host name: no pod IP


def build(*workloads: WorkloadEntry, **params: object) -> KubernetesEnvHandler:
    env = Env("kubernetesenv", "k", logging.getLogger("test"), CollectorRegistry(), workloads)
    handler = INFO.build(KubernetesEnvParams.model_validate(params), {}, env)
    assert isinstance(handler, KubernetesEnvHandler)
    return handler


def test_a_source_is_found_by_ip() -> None:
    h = build(PRODUCTPAGE, DETAILS, VM_BY_NAME)
    out = h.generate_kubernetes_attributes(KubernetesInstance("i", source_ip=IP("10.0.0.9")))
    assert out.source_pod_ip == IP("10.0.0.9")
    assert out.source_pod_name == "productpage-v1-7f9"
    assert out.source_labels == {"app": "productpage", "version": "v1"}
    assert out.source_namespace == "shop"
    assert out.source_service_account_name == "bookinfo-productpage"
    assert out.source_pod_uid == "kubernetes://productpage-v1-7f9.shop"
    assert out.source_workload_name == "productpage"  # the app label
    assert out.source_workload_namespace == "shop"
    assert out.source_workload_uid == "istio://shop/workloads/productpage"
    assert out.source_owner == "kubernetes://apis/v1/namespaces/shop/pods/productpage-v1-7f9"
    assert out.destination_pod_name == ""  # nothing asked about the destination


def test_a_destination_is_found_by_uid_before_its_ip() -> None:
    h = build(PRODUCTPAGE, DETAILS)
    out = h.generate_kubernetes_attributes(
        KubernetesInstance(
            "i", destination_uid="kubernetes://details-1.shop", destination_ip=IP("10.0.0.9")
        )
    )
    assert out.destination_pod_name == "details-1"
    # Without an app label the WorkloadEntry's own name is the workload's.
    assert out.destination_workload_name == "details-1"
    assert out.destination_labels == {}
    # An unknown uid falls back to the IP.
    out = h.generate_kubernetes_attributes(
        KubernetesInstance(
            "i", destination_uid="kubernetes://gone.shop", destination_ip=IP("10.0.0.7")
        )
    )
    assert out.destination_pod_name == "details-1"


def test_unknown_pods_and_the_unspecified_ip_find_nothing() -> None:
    h = build(PRODUCTPAGE, WorkloadEntry("any", "shop", "0.0.0.0"))
    for instance in (
        KubernetesInstance("i", source_ip=IP("10.9.9.9"), destination_uid="kubernetes://x.y"),
        KubernetesInstance("i", source_ip=IP("0.0.0.0"), destination_ip=IP("0.0.0.0")),
    ):
        assert h.generate_kubernetes_attributes(instance) == KubernetesOutput()


CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: kubernetesenv, namespace: istio-system}
spec:
  compiledAdapter: kubernetesenv
  params: %s
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: attributes, namespace: istio-system}
spec:
  compiledTemplate: kubernetes
  params:
    source_uid: source.uid | ""
    source_ip: source.ip | ip("0.0.0.0")
  attributeBindings:
    source.workload.name: $out.source_workload_name | "unknown"
    source.labels: $out.source_labels | emptyStringMap()
    source.owner: $out.source_owner | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: kubeattrgenrulerule, namespace: istio-system}
spec:
  actions: [{handler: kubernetesenv, instances: [attributes]}]
---
""" + workload_entry("productpage-v1-7f9", "10.0.0.9", "productpage")


def compile_config(tmp_path: Path, params: str = "{}") -> object:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(CONFIG % params))
    return compile_snapshot(documents.read([tmp_path / "c.yaml"]), registry.default_registry())


def test_the_bindings_give_defaults_for_an_unknown_pod(tmp_path: Path) -> None:
    snapshot = compile_config(tmp_path)
    (rule,) = snapshot.rules  # type: ignore[attr-defined]
    (action,) = rule.actions
    (instance,) = action.instances
    handler = action.handler.handler
    assert isinstance(handler, KubernetesEnvHandler)

    def produced(bag: dict[str, object]) -> dict[str, object]:
        out = handler.generate_kubernetes_attributes(instance.build(bag))
        prefix = instance.template.output_prefix
        values = {prefix + k: v for k, v in vars_of(out).items() if v not in (None, "", {})}
        return {b.attribute: b.evaluate(values) for b in instance.bindings}

    assert produced({"source.ip": IP("10.0.0.9")}) == {
        "source.workload.name": "productpage",
        "source.labels": {"app": "productpage", "version": "v1"},
        "source.owner": "kubernetes://apis/v1/namespaces/shop/pods/productpage-v1-7f9",
    }
    assert produced({"source.ip": IP("10.1.1.1")}) == {
        "source.workload.name": "unknown",
        "source.labels": {},
        "source.owner": "unknown",
    }
    assert produced({}) == produced({"source.ip": IP("10.1.1.1")})


def vars_of(out: KubernetesOutput) -> dict[str, object]:
    return {name: getattr(out, name) for name in KubernetesOutput.__slots__}


def test_mixers_params_are_accepted(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    params = (
        f'{{kubeconfig_path: "{kubeconfig}", cache_refresh_duration: 2m,'
        " cluster_registries_namespace: istio-config}"
    )
    (tmp_path / "conf").mkdir()
    compile_config(tmp_path / "conf", params)
    assert INFO.default_params["cacheRefreshDuration"] == "300s"  # Mixer's 5 minutes


@pytest.mark.parametrize(
    ("params", "path", "reason"),
    [
        ('{kubeconfig_path: "/nonexistent/kubeconfig"}', "spec.params.kubeconfig_path",
         "no such file: '/nonexistent/kubeconfig'"),
        ("{cache_refresh_duration: -1s}", "spec.params.cache_refresh_duration",
         "invalid duration"),
        ("{kubeconfig: x}", "spec.params.kubeconfig", "unknown field"),
    ],
)  # fmt: skip
def test_bad_params_are_config_errors(tmp_path: Path, params: str, path: str, reason: str) -> None:
    with pytest.raises(Rejected) as e:
        compile_config(tmp_path, params)
    (error,) = e.value.errors
    assert (error.kind, error.name, error.path) == ("handler", "kubernetesenv", path)
    assert error.reason.startswith(reason)


def test_the_handler_is_rebuilt_when_the_workload_entries_change(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(CONFIG % "{}"))
    first = compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    same = compile_snapshot(documents.read([tmp_path]), registry.default_registry(), previous=first)
    name = "kubernetesenv.handler.istio-system"
    assert same.handlers[name].handler is first.handlers[name].handler
    (tmp_path / "c.yaml").write_text(textwrap.dedent(CONFIG % "{}").replace("10.0.0.9", "10.0.0.8"))
    moved = compile_snapshot(documents.read([tmp_path]), registry.default_registry(), previous=same)
    handler = moved.handlers[name].handler
    assert handler is not first.handlers[name].handler
    assert isinstance(handler, KubernetesEnvHandler)
    assert handler.find("", IP("10.0.0.8")) is not None
    assert handler.find("", IP("10.0.0.9")) is None
