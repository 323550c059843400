"""zipkin's params: Mixer's zipkin adapter config (mixer/adapter/zipkin/config/config.proto)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from pydantic import Field

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.batching import BatchParams
from mixerhub.types import Params


class ZipkinParams(Params):
    # The collector's span endpoint, e.g. http://zipkin.istio-system:9411/api/v2/spans. Required.
    url: str = ""
    # The share of traces sent, decided per trace. 0, Mixer's default, sends nothing: in Mixer a
    # zipkin handler without it had tracing "not configured".
    sample_probability: float = 0.0
    batching: BatchParams = Field(default_factory=BatchParams)


def validate(params: ZipkinParams, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    """Mixer's check (zipkin.go, builder.Validate), and that the url can be posted to."""
    p = params.sample_probability
    if math.isnan(p) or not 0 <= p <= 1:
        yield FieldError("sampleProbability", "must be between 0 and 1 inclusive")
    if not params.url:
        yield FieldError("url", "required: the Zipkin collector's /api/v2/spans URL")
        return
    url = urlsplit(params.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        yield FieldError("url", f"not an http or https URL with a host: {params.url!r}")
