"""Templates: the shapes of the instances that rules send to handlers (Mixer's template protos).

An instance's params in configuration are expressions, one per field; at request time they are
evaluated into one of the typed instance classes below, which is what a handler receives. Field
names are snake_case as in the protos; configuration may also spell them camelCase as protobuf JSON
does (``traceId``), since Istio's own tracespan configuration does.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mixerhub.attributes import ValueType

ANY = ValueType.VALUE_TYPE_UNSPECIFIED

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Variety(enum.Enum):
    """When a template's instances are dispatched (Mixer's TemplateVariety)."""

    CHECK = "check"  # on ext_authz Check; the handler answers allow or deny
    REPORT = "report"  # on access-log ingestion, in batches
    QUOTA = "quota"  # on Check, asking for an allocation
    # Mixer's ATTRIBUTE_GENERATOR: run first, before check and report rules; the handler's output
    # is bound back into the bag by the instance's attributeBindings (``$out.<field>``).
    ATTRIBUTE_GENERATOR = "attribute_generator"


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One field: a scalar of ``type``, a map of string to ``type``, or a message of ``fields``."""

    name: str
    type: ValueType = ANY
    is_map: bool = False
    fields: tuple[TemplateField, ...] = ()
    # Other types an expression for this field may have (listentry's value takes IP_ADDRESS
    # too since Istio 1.1, istio/istio#10468, which Istio's own deny-ip sample relies on).
    also: frozenset[ValueType] = frozenset()


# The instance classes. Every one has the instance's configured name first; fields the
# configuration leaves out keep their zero value, as in Mixer.


@dataclass(slots=True)
class MetricInstance:
    name: str
    value: Any = None
    dimensions: dict[str, Any] = field(default_factory=dict)
    monitored_resource_type: str = ""
    monitored_resource_dimensions: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class LogEntryInstance:
    name: str
    variables: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime.datetime | None = None
    severity: str = ""
    monitored_resource_type: str = ""
    monitored_resource_dimensions: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TraceSpanInstance:
    name: str
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""
    span_name: str = ""
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    span_tags: dict[str, Any] = field(default_factory=dict)
    http_status_code: int = 0
    client_span: bool = False
    rewrite_client_span_id: bool = False
    source_name: str = ""
    source_ip: IPAddress | None = None
    destination_name: str = ""
    destination_ip: IPAddress | None = None
    request_size: int = 0
    request_total_size: int = 0
    response_size: int = 0
    response_total_size: int = 0
    api_protocol: str = ""


@dataclass(slots=True)
class QuotaInstance:
    name: str
    dimensions: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Subject:
    user: str = ""
    groups: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Action:
    namespace: str = ""
    service: str = ""
    method: str = ""
    path: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AuthorizationInstance:
    name: str
    subject: Subject = field(default_factory=Subject)
    action: Action = field(default_factory=Action)


@dataclass(slots=True)
class ListEntryInstance:
    name: str
    value: str | IPAddress = ""


@dataclass(slots=True)
class ApiKeyInstance:
    name: str
    api: str = ""
    api_version: str = ""
    api_operation: str = ""
    api_key: str = ""
    timestamp: datetime.datetime | None = None


@dataclass(slots=True)
class CheckNothingInstance:
    name: str


@dataclass(slots=True)
class ReportNothingInstance:
    name: str


@dataclass(slots=True)
class KubernetesInstance:
    """What a kubernetesenv handler is asked about: the two ends of a request."""

    name: str
    source_uid: str = ""
    source_ip: IPAddress | None = None
    destination_uid: str = ""
    destination_ip: IPAddress | None = None
    destination_port: int = 0


@dataclass(slots=True)
class KubernetesOutput:
    """The kubernetes template's OutputTemplate: what a handler found about each end.

    A field left at its zero value was not found: it reads as absent through ``$out``, so the
    binding's ``|`` default applies (Mixer's generated output tracked set fields the same way).
    """

    source_pod_ip: IPAddress | None = None
    source_pod_name: str = ""
    source_labels: dict[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    source_service_account_name: str = ""
    source_host_ip: IPAddress | None = None
    source_workload_uid: str = ""
    source_workload_name: str = ""
    source_workload_namespace: str = ""
    source_owner: str = ""
    source_pod_uid: str = ""
    destination_pod_ip: IPAddress | None = None
    destination_pod_name: str = ""
    destination_container_name: str = ""
    destination_labels: dict[str, str] = field(default_factory=dict)
    destination_namespace: str = ""
    destination_service_account_name: str = ""
    destination_host_ip: IPAddress | None = None
    destination_workload_uid: str = ""
    destination_workload_name: str = ""
    destination_workload_namespace: str = ""
    destination_owner: str = ""
    destination_pod_uid: str = ""


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    variety: Variety
    description: str
    fields: tuple[TemplateField, ...]
    instance: type[Any]
    # The field classes of message fields, by field name (authorization's subject and action).
    messages: Mapping[str, type[Any]] = field(default_factory=dict)
    # Attribute generators only: the OutputTemplate's fields and class.
    output: tuple[TemplateField, ...] = ()
    output_class: type[Any] | None = None

    @property
    def output_prefix(self) -> str:
        """How ``$out.`` is spelled once an attribute binding is compiled: Mixer rewrote it to
        this name before compiling (mixer/template/template.gen.go), ``$`` being no identifier."""
        return f"adapter_template_{self.name}.output."

    def field_named(self, name: str) -> TemplateField | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


def _f(name: str, type_: ValueType = ANY) -> TemplateField:
    return TemplateField(name, type_)


def _map(name: str) -> TemplateField:
    return TemplateField(name, ANY, is_map=True)


_S, _I, _B, _T = ValueType.STRING, ValueType.INT64, ValueType.BOOL, ValueType.TIMESTAMP
_IP, _SM = ValueType.IP_ADDRESS, ValueType.STRING_MAP


def _end_output(end: str) -> tuple[TemplateField, ...]:
    """The output fields describing one end (source or destination) of a request."""
    return (
        _f(f"{end}_pod_ip", _IP),
        _f(f"{end}_pod_name", _S),
        _f(f"{end}_labels", _SM),
        _f(f"{end}_namespace", _S),
        _f(f"{end}_service_account_name", _S),
        _f(f"{end}_host_ip", _IP),
        _f(f"{end}_workload_uid", _S),
        _f(f"{end}_workload_name", _S),
        _f(f"{end}_workload_namespace", _S),
        _f(f"{end}_owner", _S),
        _f(f"{end}_pod_uid", _S),
    )


TEMPLATES: Mapping[str, Template] = {
    t.name: t
    for t in (
        Template(
            "metric",
            Variety.REPORT,
            "A value and dimensions to record in a metrics backend.",
            (
                _f("value"),
                _map("dimensions"),
                _f("monitored_resource_type", _S),
                _map("monitored_resource_dimensions"),
            ),
            MetricInstance,
        ),
        Template(
            "logentry",
            Variety.REPORT,
            "A log entry: variables, timestamp and severity.",
            (
                _map("variables"),
                _f("timestamp", _T),
                _f("severity", _S),
                _f("monitored_resource_type", _S),
                _map("monitored_resource_dimensions"),
            ),
            LogEntryInstance,
        ),
        Template(
            "tracespan",
            Variety.REPORT,
            "One span of a distributed trace.",
            (
                _f("trace_id", _S),
                _f("span_id", _S),
                _f("parent_span_id", _S),
                _f("span_name", _S),
                _f("start_time", _T),
                _f("end_time", _T),
                _map("span_tags"),
                _f("http_status_code", _I),
                _f("client_span", _B),
                _f("rewrite_client_span_id", _B),
                _f("source_name", _S),
                _f("source_ip", ValueType.IP_ADDRESS),
                _f("destination_name", _S),
                _f("destination_ip", ValueType.IP_ADDRESS),
                _f("request_size", _I),
                _f("request_total_size", _I),
                _f("response_size", _I),
                _f("response_total_size", _I),
                _f("api_protocol", _S),
            ),
            TraceSpanInstance,
        ),
        Template(
            "quota",
            Variety.QUOTA,
            "Dimensions that identify a quota bucket.",
            (_map("dimensions"),),
            QuotaInstance,
        ),
        Template(
            "authorization",
            Variety.CHECK,
            "Who (subject) does what (action): for authorization adapters.",
            (
                TemplateField(
                    "subject", fields=(_f("user", _S), _f("groups", _S), _map("properties"))
                ),
                TemplateField(
                    "action",
                    fields=(
                        _f("namespace", _S),
                        _f("service", _S),
                        _f("method", _S),
                        _f("path", _S),
                        _map("properties"),
                    ),
                ),
            ),
            AuthorizationInstance,
            {"subject": Subject, "action": Action},
        ),
        Template(
            "listentry",
            Variety.CHECK,
            "One value to look up in a list.",
            (TemplateField("value", _S, also=frozenset({ValueType.IP_ADDRESS})),),
            ListEntryInstance,
        ),
        Template(
            "apikey",
            Variety.CHECK,
            "An API key and the API operation it is used for.",
            (
                _f("api", _S),
                _f("api_version", _S),
                _f("api_operation", _S),
                _f("api_key", _S),
                _f("timestamp", _T),
            ),
            ApiKeyInstance,
        ),
        Template(
            "checknothing",
            Variety.CHECK,
            "No data: for handlers that decide alone (denier).",
            (),
            CheckNothingInstance,
        ),
        Template(
            "reportnothing",
            Variety.REPORT,
            "No data: for handlers that only count reports.",
            (),
            ReportNothingInstance,
        ),
        Template(
            "kubernetes",
            Variety.ATTRIBUTE_GENERATOR,
            "The pods at both ends of a request, looked up by uid or IP.",
            (
                _f("source_uid", _S),
                _f("source_ip", _IP),
                _f("destination_uid", _S),
                _f("destination_ip", _IP),
                _f("destination_port", _I),
            ),
            KubernetesInstance,
            output=(
                *_end_output("source"),
                *_end_output("destination"),
                _f("destination_container_name", _S),
            ),
            output_class=KubernetesOutput,
        ),
    )
}


def snake_case(name: str) -> str:
    """protobuf JSON's camelCase name to the proto's snake_case (``traceId`` -> ``trace_id``)."""
    if name.islower() or "_" in name:
        return name
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
