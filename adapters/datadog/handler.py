"""dogstatsd's handler: metric instances sent to a Datadog agent (Mixer's dogstatsd.go).

The datadog package's DogStatsd client formats, samples and packs the metrics, as datadog-go did
for Mixer: counters increment, gauges gauge, a DISTRIBUTION of durations is a timing in
milliseconds and one of INT64s a histogram. Dimensions become ``key:value`` tags beside the
metric's tags and ``globalTags``.

The client never touches the network from the request path nor from a thread of its own:
``handle_metric`` only queues (mixerhub.batching), and the BatchSender, on the event loop, hands
each batch to the client between ``open_buffer()`` and ``close_buffer()``. The client's socket is
the hub's UDP endpoint (adapters/statsd/udp.py): its ``send`` is a non-blocking sendto of an
asyncio transport, and the name was resolved without blocking when it connected. The client
is built with no flush thread, no background sender and no telemetry.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from datadog.dogstatsd.base import DogStatsd

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.batching import BatchSender
from mixerhub.templates import MetricInstance

from ..statsd.config import parse_address
from ..statsd.names import dimension_text
from ..statsd.udp import Outage, UdpEndpoint
from .config import DogStatsdParams

_MS = datetime.timedelta(milliseconds=1)

Kind = Literal["count", "gauge", "timing", "histogram"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One call to make on the client, queued until the batch is sent."""

    kind: Kind
    name: str
    value: float
    tags: list[str]


@dataclass(frozen=True, slots=True)
class _Metric:
    type: str
    name: str
    tags: Mapping[str, str]
    tag_list: list[str]  # the tags alone, for instances without dimensions


class DogStatsdHandler(Handler):
    def __init__(self, params: DogStatsdParams, env: Env) -> None:
        self.params, self.env = params, env
        host, port = parse_address(params.address)
        self._outage = Outage("dogstatsd", env, f"{host}:{port}")
        self._endpoint = UdpEndpoint(host, port, self._outage.error)
        self._client = _client(params, host, port)
        self._client.socket = cast(socket.socket, _EndpointSocket(self._endpoint, self._lost))
        self._emit: Mapping[Kind, Callable[[str, float, list[str]], None]] = {
            "count": self._client.increment,
            "gauge": self._client.gauge,
            "timing": self._client.timing,
            "histogram": self._client.histogram,
        }
        self._metrics = {
            instance: _Metric(
                info.type, info.name, info.tags, [f"{k}:{v}" for k, v in info.tags.items()]
            )
            for instance, info in params.metrics.items()
        }
        self._per_datagram = params.buffer_length
        self._lost_count = 0  # datagram lines the OS refused, all time
        self._sender: BatchSender[Sample] = BatchSender(
            env.adapter, env.handler, self._send, params.batching
        )

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        out: list[Sample] = []
        failed = 0
        for i in instances:
            metric = self._metrics.get(i.name)
            sample = None if metric is None else _sample(metric, i)
            if sample is None:
                failed += 1
                self.env.logger.debug("dogstatsd: %s: cannot send value %r", i.name, i.value)
                continue
            out.append(sample)
        if failed:
            self.env.count_error(failed)
        dropped = self._sender.add(out) if out else 0
        return ExportResult.FAILURE if failed or dropped else ExportResult.SUCCESS

    async def _send(self, batch: list[Sample]) -> None:
        # Connecting resolves the name; a failure raises, and the BatchSender retries the batch.
        await self._endpoint.open()
        client, emit = self._client, self._emit
        step = self._per_datagram or len(batch)
        lost_before = self._lost_count
        for start in range(0, len(batch), step):
            # The client packs what is emitted between these into datagrams of its UDP payload
            # size; close_buffer() sends the rest. Sampling happens here, in the client.
            client.open_buffer()
            try:
                for s in batch[start : start + step]:
                    emit[s.kind](s.name, s.value, s.tags)
            finally:
                client.close_buffer()
        if self._lost_count == lost_before and self._endpoint.connected:
            self._outage.recovered()

    def _lost(self, n: int) -> None:
        self._lost_count += n
        self.env.count_dropped("send_failed", n)

    async def close(self) -> None:
        await self._sender.close()
        await self._endpoint.close()


def _sample(metric: _Metric, instance: MetricInstance) -> Sample | None:
    if instance.dimensions:
        tags = dict(metric.tags)
        tags.update((k, dimension_text(v)) for k, v in instance.dimensions.items())
        tag_list = [f"{k}:{v}" for k, v in tags.items()]
    else:
        tag_list = metric.tag_list
    value = instance.value
    kind: Kind
    if metric.type == "DISTRIBUTION" and isinstance(value, datetime.timedelta):
        return Sample("timing", metric.name, value / _MS, tag_list)
    if type(value) is not int:
        return None
    if metric.type == "COUNTER":
        kind = "count"
    elif metric.type == "GAUGE":
        kind = "gauge"
    else:
        kind = "histogram"
    return Sample(kind, metric.name, value, tag_list)


def _client(params: DogStatsdParams, host: str, port: int) -> DogStatsd:
    prefix = params.prefix
    # The client joins its namespace to names with a dot; Mixer's prefix carries its own.
    namespace = prefix[:-1] if prefix.endswith(".") else prefix
    global_tags = [f"{k}:{v}" for k, v in params.global_tags.items()]
    client = DogStatsd(
        host=host,
        port=port,
        namespace=namespace or None,
        constant_tags=global_tags,
        default_sample_rate=params.sample_rate,
        # Flushed by close_buffer() on the event loop only: no flush thread, no sender thread.
        disable_buffering=True,
        disable_aggregation=True,
        disable_background_sender=True,
        # Mixer's datadog-go sent no client telemetry; and the hub's own container is not the
        # origin of the mesh's metrics, so no origin detection either.
        disable_telemetry=True,
        origin_detection_enabled=False,
        track_instance=False,
    )
    # The client adds DD_ENV, DD_SERVICE... from the hub's environment to its constant tags;
    # these metrics describe the mesh's workloads, so only globalTags apply, as in Mixer.
    client.constant_tags = global_tags
    return client


class _EndpointSocket:
    """Where the DogStatsd client writes its datagrams: the hub's non-blocking UDP endpoint.

    The client needs ``send`` (it checks the socket type with ``getsockopt`` and ``family`` to
    choose UDP's payload size). A datagram the OS refuses is counted as lost, by its lines.
    """

    family = socket.AF_INET
    type = socket.SOCK_DGRAM

    def __init__(self, endpoint: UdpEndpoint, lost: Callable[[int], None]) -> None:
        self._endpoint, self._lost = endpoint, lost

    def getsockopt(self, level: int, option: int) -> int:
        return socket.SOCK_DGRAM

    def send(self, data: bytes) -> int:
        if not self._endpoint.send(data):
            self._lost(sum(1 for line in data.split(b"\n") if line))
        return len(data)

    def settimeout(self, timeout: float | None) -> None:
        pass  # never blocks

    def close(self) -> None:
        pass  # the handler closes the endpoint


def build(
    params: DogStatsdParams, instances: Mapping[str, InstanceSpec], env: Env
) -> DogStatsdHandler:
    return DogStatsdHandler(params, env)
