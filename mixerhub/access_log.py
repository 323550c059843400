"""envoy.service.accesslog.v3.AccessLogService: the access logs Envoy streams to the hub.

The stream's first message names the reporting workload; every message after carries a batch of
HTTP or TCP entries. Each batch becomes attributes and goes through the report rules at once, so
each handler gets the batch's instances in one call. Envoy's side is lossy by design and never
waits for an answer: the hub keeps up or Envoy drops (access_logs.*.logs_dropped).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import Counter

from mixerhub.access_log_attributes import BagPlan, Reporter
from mixerhub.access_log_dispatch import ReportPrograms
from mixerhub.dispatcher import ReportDispatcher
from mixerhub.monitoring import REGISTRY
from mixerhub.snapshot import Snapshot

log = logging.getLogger("mixerhub.access_log")

ENTRIES = Counter(
    "mixerhub_accesslog_entries",
    "Access-log entries received from Envoy, by type (http, tcp).",
    ["type"],
    registry=REGISTRY,
)
STREAMS = Counter(
    "mixerhub_accesslog_streams", "Access-log streams opened by Envoy.", registry=REGISTRY
)
_HTTP, _TCP = ENTRIES.labels("http"), ENTRIES.labels("tcp")


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.programs: ReportPrograms | None = None

    def activate(self, snapshot: Snapshot) -> None:
        """A new snapshot: the next batch of every stream goes through its rules."""
        reports = ReportDispatcher(snapshot)
        plan = BagPlan(snapshot.referenced)
        if reports.empty:
            self.programs = None
            return
        programs = ReportPrograms(reports, plan, snapshot.attributes)
        self.programs = programs
        # Generated off the event loop; until they are ready, entries take the general path.
        threading.Thread(target=programs.prepare, name="access-log-programs", daemon=True).start()

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        STREAMS.inc()
        reporter = Reporter()
        async for message in request_iterator:
            if message.HasField("identifier"):
                reporter = Reporter.from_identifier(message.identifier)
            self.ingest(message, reporter)
        return als_pb2.StreamAccessLogsResponse()

    def ingest(self, message: als_pb2.StreamAccessLogsMessage, reporter: Reporter) -> int:
        """One message's entries through the report rules; returns instances dispatched."""
        programs = self.programs
        if message.HasField("http_logs"):
            entries = message.http_logs.log_entry
            _HTTP.inc(len(entries))
            kind = "http"
        elif message.HasField("tcp_logs"):
            entries = message.tcp_logs.log_entry
            _TCP.inc(len(entries))
            kind = "tcp"
        else:
            return 0
        if programs is None:
            return 0
        # Reports are scoped like Mixer's: by the namespace of the workload that reported.
        return programs.dispatch(kind, entries, reporter)
