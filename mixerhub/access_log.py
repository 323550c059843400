"""envoy.service.accesslog.v3.AccessLogService: the access logs Envoy streams to the hub.

Entries are counted per type here; the report dispatcher (attributes -> report rules ->
metric/logentry/tracespan handlers) plugs in where each message is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY

ENTRIES = Counter(
    "mixerhub_accesslog_entries",
    "Access-log entries received from Envoy, by type (http, tcp).",
    ["type"],
    registry=REGISTRY,
)
STREAMS = Counter(
    "mixerhub_accesslog_streams", "Access-log streams opened by Envoy.", registry=REGISTRY
)


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        STREAMS.inc()
        http, tcp = ENTRIES.labels("http"), ENTRIES.labels("tcp")
        async for message in request_iterator:
            if message.HasField("http_logs"):
                http.inc(len(message.http_logs.log_entry))
            elif message.HasField("tcp_logs"):
                tcp.inc(len(message.tcp_logs.log_entry))
        return als_pb2.StreamAccessLogsResponse()
