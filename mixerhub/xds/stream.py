"""What the two ADS variants share: one stream's inbox and its life from first request to close.

A stream reacts to two things, Envoy's requests and changes of its node's snapshot; both go into
one queue so that a protocol object sees them one at a time, in order, without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import grpc

from mixerhub.monitoring import XDS_CONNECTED_PROXIES, XDS_NACKS, XDS_PUSH_SECONDS, XDS_PUSHES
from mixerhub.xds.cache import SnapshotCache, Watch
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import SHORT_NAMES

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
_RequestIn = TypeVar("_RequestIn", contravariant=True)
_ResponseOut = TypeVar("_ResponseOut", covariant=True)


class Signal(enum.Enum):
    CHANGED = "changed"  # the node's snapshot was set
    END = "end"  # Envoy closed its side, or the service is shutting down


class Inbox(Generic[Request]):
    """Envoy's requests and the snapshot's change signals, in arrival order."""

    def __init__(self, requests: AsyncIterator[Request]) -> None:
        self._queue: asyncio.Queue[Request | Signal] = asyncio.Queue()
        # At most one CHANGED waits in the queue: a stream that is slow to write sees the latest
        # snapshot once, not every one set meanwhile.
        self._change_queued = False
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[Request]) -> None:
        try:
            async for request in requests:
                self._queue.put_nowait(request)
        except Exception as error:  # Envoy went away mid-stream: the stream ends all the same.
            log.debug("xDS stream read ended: %r", error)
        finally:
            self._queue.put_nowait(Signal.END)

    def changed(self) -> None:
        if not self._change_queued:
            self._change_queued = True
            self._queue.put_nowait(Signal.CHANGED)

    def end(self) -> None:
        self._queue.put_nowait(Signal.END)

    async def next(self) -> Request | Signal:
        item = await self._queue.get()
        if item is Signal.CHANGED:
            self._change_queued = False
        return item

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class StreamProtocol(Protocol[_RequestIn, _ResponseOut]):
    """One stream's xDS state machine (SotwStream, DeltaStream): the responses to send."""

    def on_request(self, request: _RequestIn) -> Sequence[_ResponseOut]: ...

    def on_change(self) -> Sequence[_ResponseOut]: ...


class NodeRequest(Protocol):
    """DiscoveryRequest and DeltaDiscoveryRequest both carry the node."""

    @property
    def node(self) -> Any: ...

    def HasField(self, field_name: str) -> bool: ...


def _type_label(type_url: str) -> str:
    # Type URLs come from the network: anything unknown is one label, not a new series each.
    return SHORT_NAMES.get(type_url, "other")


def record_push(type_url: str, watch: Watch, set_at: float) -> None:
    XDS_PUSHES.labels(_type_label(type_url)).inc()
    # Latency only for snapshots set while the stream was open: a stream that connects to an
    # old snapshot says nothing about how fast changes reach Envoy.
    if set_at >= watch.opened_at:
        XDS_PUSH_SECONDS.observe(time.monotonic() - set_at)


def record_nack(type_url: str) -> None:
    XDS_NACKS.labels(_type_label(type_url)).inc()


class Streams:
    """The open streams of one service, so that shutdown can end them cleanly."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._inboxes: set[Inbox[Any]] = set()
        self._closing = False

    def close(self) -> None:
        """End every open stream with OK (and refuse new ones): call before the server stops,
        so that its grace period is not spent waiting on streams that never end by themselves."""
        self._closing = True
        for inbox in self._inboxes:
            inbox.end()

    async def serve(
        self,
        requests: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
        protocol: Callable[[Proxy, Watch], StreamProtocol[Request, Response]],
    ) -> AsyncIterator[Response]:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down")
        inbox = Inbox(requests)
        self._inboxes.add(inbox)
        try:
            first = await inbox.next()
            if isinstance(first, Signal):
                return
            node_request: NodeRequest = first  # type: ignore[assignment]
            if not node_request.HasField("node") or not node_request.node.id:
                # The xDS protocol: the first request on a stream carries the node.
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id"
                )
            proxy = Proxy.from_node(node_request.node)
            watch = self.cache.watch(proxy, inbox.changed)
            XDS_CONNECTED_PROXIES.inc()
            log.info("xDS stream opened for %s", proxy.node_id)
            try:
                stream = protocol(proxy, watch)
                item: Request | Signal = first
                while item is not Signal.END:
                    if item is Signal.CHANGED:
                        responses = stream.on_change()
                    else:
                        responses = stream.on_request(item)
                    for response in responses:
                        yield response
                    item = await inbox.next()
            finally:
                watch.close()
                XDS_CONNECTED_PROXIES.dec()
                log.info("xDS stream closed for %s", proxy.node_id)
        finally:
            self._inboxes.discard(inbox)
            await inbox.close()
