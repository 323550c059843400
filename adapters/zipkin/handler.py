"""zipkin's handler: tracespan instances POSTed to a Zipkin collector as v2 JSON, in batches.

Spans are converted when they arrive and queued in the hub's BatchSender; each batch is one
``POST /api/v2/spans`` through the handler's own aiohttp session. A response other than 2xx is a
failure, retried with backoff like a connection refused. A span whose trace or span id is
malformed is dropped and counted (``invalid_id``), one without any trace id too
(``no_trace_id``: Mixer skipped both silently).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence

import aiohttp

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.batching import BatchSender
from mixerhub.templates import TraceSpanInstance

from . import spans
from .config import ZipkinParams

_HEADERS = {"Content-Type": "application/json"}


class CollectorError(Exception):
    """The collector answered, but not with 2xx."""


class ZipkinHandler(Handler):
    def __init__(self, params: ZipkinParams, env: Env) -> None:
        self.params, self.env = params, env
        self._url = params.url
        self._probability = params.sample_probability
        self._session: aiohttp.ClientSession | None = None
        self._sender: BatchSender[spans.Span] = BatchSender(
            env.adapter, env.handler, self._send, params.batching
        )

    def handle_tracespan(self, instances: Sequence[TraceSpanInstance]) -> ExportResult:
        try:
            return self._handle(instances)
        except Exception:  # never into the dispatcher
            self.env.count_error()
            self.env.logger.exception("zipkin: handling %d spans failed", len(instances))
            return ExportResult.FAILURE

    def _handle(self, instances: Sequence[TraceSpanInstance]) -> ExportResult:
        if self._probability <= 0:
            return ExportResult.SUCCESS  # Mixer: no sampler, tracing not configured
        queued: list[spans.Span] = []
        untraced = invalid = 0
        for instance in instances:
            try:
                found = spans.ids(instance)
            except spans.InvalidId as e:
                invalid += 1
                self.env.logger.debug("zipkin: span of %s dropped: %s", instance.name, e)
                continue
            if found is None:
                untraced += 1
                continue
            if spans.sampled(found[0], self._probability):
                queued.append(spans.span(instance, *found))
        if untraced:
            self.env.count_dropped("no_trace_id", untraced)
        if invalid:
            self.env.count_dropped("invalid_id", invalid)
        dropped = self._sender.add(queued) if queued else 0
        return ExportResult.FAILURE if invalid or dropped else ExportResult.SUCCESS

    async def _send(self, batch: list[spans.Span]) -> None:
        if self._session is None:
            # Timeouts are the BatchSender's; the session's own would only second-guess them.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        body = json.dumps(batch, separators=(",", ":")).encode()
        async with self._session.post(self._url, data=body, headers=_HEADERS) as response:
            text = await response.text(errors="replace")
            if not 200 <= response.status < 300:
                raise CollectorError(f"{self._url} answered {response.status}: {text[:200]}")

    async def close(self) -> None:
        await self._sender.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def build(params: ZipkinParams, instances: Mapping[str, InstanceSpec], env: Env) -> ZipkinHandler:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "zipkin sends in the background and must be built inside the hub's event loop"
        ) from None
    if params.sample_probability <= 0:
        env.logger.warning(
            "%s: sampleProbability is 0, so no span is sent (Mixer's default)", env.handler
        )
    return ZipkinHandler(params, env)
