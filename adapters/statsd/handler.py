"""statsd's handler: metric instances as StatsD lines over UDP (Mixer's statsd.go).

``handle_metric`` samples each value, formats its line and queues it; it never waits. The
BatchSender sends the queue every ``flushDuration`` (or once ``batching.batchSize`` lines wait),
packed into datagrams of ``flushBytes``, over a UDP socket of the event loop. A receiver that is
down costs counted errors and drops, never an exception or a wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.batching import BatchParams, BatchSender
from mixerhub.templates import MetricInstance

from . import lines
from .config import DEFAULT_FLUSH_BYTES, StatsdParams, flush_interval_given, parse_address
from .names import NameTemplate
from .udp import Outage, UdpEndpoint

_FORMAT: Mapping[str, Callable[[str, object, str], str | None]] = {
    "COUNTER": lines.counter,
    "GAUGE": lines.gauge,
    "DISTRIBUTION": lines.timer,
}


@dataclass(frozen=True, slots=True)
class _Metric:
    format: Callable[[str, object, str], str | None]
    template: NameTemplate | None  # None: the instance's full name


class StatsdHandler(Handler):
    def __init__(self, params: StatsdParams, env: Env) -> None:
        self.params, self.env = params, env
        host, port = parse_address(params.address)
        self._prefix = _prefix(params.prefix)
        self._rate = params.sampling_rate
        self._suffix = lines.rate_suffix(self._rate)
        self._metrics = {
            name: _Metric(
                _FORMAT[info.type],
                NameTemplate.parse(info.name_template) if info.name_template else None,
            )
            for name, info in params.metrics.items()
        }
        # Mixer sent 512-byte datagrams when flushBytes was 0.
        self._flush_bytes = params.flush_bytes or DEFAULT_FLUSH_BYTES
        self._outage = Outage("statsd", env, f"{host}:{port}")
        self._endpoint = UdpEndpoint(host, port, self._outage.error)
        self._sender: BatchSender[str] = BatchSender(
            env.adapter, env.handler, self._send, _batching(params)
        )

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        rate, suffix, prefix = self._rate, self._suffix, self._prefix
        out: list[str] = []
        failed = 0
        for i in instances:
            metric = self._metrics.get(i.name)
            if metric is None:  # validation keeps this from happening; count it if it does
                failed += 1
                continue
            # Sampled per value, as StatsD clients do; the line then says at which rate.
            if rate < 1 and random.random() >= rate:
                continue
            name = i.name if metric.template is None else metric.template.render(i.dimensions)
            line = metric.format(prefix + name, i.value, suffix)
            if line is None:
                failed += 1
                self.env.logger.debug("statsd: %s: cannot send value %r", i.name, i.value)
                continue
            out.append(line)
        if failed:
            self.env.count_error(failed)
        dropped = self._sender.add(out) if out else 0
        return ExportResult.FAILURE if failed or dropped else ExportResult.SUCCESS

    async def _send(self, batch: list[str]) -> None:
        # Connecting resolves the name; a failure raises, and the BatchSender retries the batch.
        await self._endpoint.open()
        dropped = 0
        for datagram, count in lines.pack(batch, self._flush_bytes):
            if not self._endpoint.send(datagram):
                dropped += count
        if dropped:
            self.env.count_dropped("send_failed", dropped)
        elif self._endpoint.connected:
            self._outage.recovered()

    async def close(self) -> None:
        await self._sender.close()
        await self._endpoint.close()


def _prefix(prefix: str) -> str:
    # cactus joined a prefix to each name with a dot; one already ending in a dot keeps it.
    if not prefix or prefix.endswith("."):
        return prefix
    return prefix + "."


def _batching(params: StatsdParams) -> BatchParams:
    """The queue's params, flushing every flushDuration unless batching says otherwise."""
    if flush_interval_given(params):
        return params.batching
    return params.batching.model_copy(update={"flush_interval": params.flush_duration})


def build(params: StatsdParams, instances: Mapping[str, InstanceSpec], env: Env) -> StatsdHandler:
    return StatsdHandler(params, env)
