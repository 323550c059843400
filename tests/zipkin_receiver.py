"""A Zipkin collector stand-in on 127.0.0.1: ``POST /api/v2/spans`` with a JSON list of v2 spans.

It records every request's spans (``batches``) and checks each span against Zipkin's v2 model
(https://zipkin.io/zipkin-api/): ids of 16 or 32 lowercase hex, a known kind, integer
microseconds, string tags; anything off is put in ``problems``. ``status`` switches its answer
(503 for a collector that is overloaded); ``stop()`` and ``start()`` take it off the port and
back on the same port.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

_ID = re.compile(r"[0-9a-f]{16}")
_TRACE_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}
_FIELDS = {
    "traceId", "id", "parentId", "name", "kind", "timestamp", "duration", "debug", "shared",
    "localEndpoint", "remoteEndpoint", "annotations", "tags",
}  # fmt: skip
_ENDPOINT_FIELDS = {"serviceName", "ipv4", "ipv6", "port"}


class ZipkinReceiver:
    def __init__(self) -> None:
        self.port = 0
        self.status = 202
        self.batches: list[list[dict[str, Any]]] = []
        self.requests = 0
        self.problems: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v2/spans"

    @property
    def spans(self) -> list[dict[str, Any]]:
        return [span for batch in self.batches for span in batch]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v2/spans", self._spans)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _spans(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 202:
            return web.Response(status=self.status, text="unavailable")
        if request.content_type != "application/json":
            self.problems.append(f"content type {request.content_type!r}")
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            self.problems.append(f"not JSON: {e}")
            return web.Response(status=400)
        if not isinstance(body, list):
            self.problems.append("the body is not a list of spans")
            return web.Response(status=400)
        for span in body:
            self._check(span)
        self.batches.append(body)
        return web.Response(status=202)

    def _check(self, span: Any) -> None:
        if not isinstance(span, dict):
            self.problems.append(f"not a span: {span!r:.200}")
            return
        extra = set(span) - _FIELDS
        if extra:
            self.problems.append(f"unknown span fields {sorted(extra)}")
        if not _TRACE_ID.fullmatch(str(span.get("traceId"))):
            self.problems.append(f"traceId {span.get('traceId')!r}")
        for key in ("id", "parentId"):
            if (key == "id" or key in span) and not _ID.fullmatch(str(span.get(key))):
                self.problems.append(f"{key} {span.get(key)!r}")
        if "kind" in span and span["kind"] not in _KINDS:
            self.problems.append(f"kind {span['kind']!r}")
        for key in ("timestamp", "duration"):
            value = span.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.problems.append(f"{key} {value!r} is not a positive integer of microseconds")
        for key in ("localEndpoint", "remoteEndpoint"):
            endpoint = span.get(key, {})
            if not isinstance(endpoint, dict) or set(endpoint) - _ENDPOINT_FIELDS:
                self.problems.append(f"{key} {endpoint!r}")
        tags = span.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            self.problems.append(f"tags are not strings: {tags!r}")
        for annotation in span.get("annotations", []):
            if set(annotation) != {"timestamp", "value"}:
                self.problems.append(f"annotation {annotation!r}")
