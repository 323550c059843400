"""The hub process: every gRPC service on one port, the HTTP port, the config store, shutdown.

One grpc.aio server on uvloop carries the standard health service, server reflection and the
Envoy-facing services (ext_authz, access logs, rate limits, ADS). SIGTERM or SIGINT drains:
health turns NOT_SERVING, ADS streams end (Envoys keep their config and reconnect to another
hub), in-flight calls get ``drain_seconds`` to finish, then adapters are closed (flushing what
they queued) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from mixerhub import admin
from mixerhub.access_log import AccessLogService
from mixerhub.ca.authority import Authority, CAConfig
from mixerhub.ca.rotation import watch_extra_roots
from mixerhub.ca.service import CaServer, start_ca_server
from mixerhub.ca.tokens import BootstrapTokens
from mixerhub.ext_authz import AuthorizationService, FailurePolicy
from mixerhub.rate_limit import RateLimitService
from mixerhub.ratelimit.backend import Backend
from mixerhub.registry import Registry
from mixerhub.security import jwks
from mixerhub.snapshot import Snapshot
from mixerhub.store.watch import ConfigStore
from mixerhub.xds.ads import SERVICE_NAME as ADS_SERVICE
from mixerhub.xds.ads import AggregatedDiscoveryService
from mixerhub.xds.cache import SnapshotCache
from mixerhub.xds.push import Pusher
from mixerhub.xds.secrets import SecretIssuer
from mixerhub.xds.translate import translate

log = logging.getLogger("mixerhub")

_SERVICES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    ADS_SERVICE,
)


@dataclass(frozen=True)
class ServeOptions:
    config: Sequence[str]
    address: str = "127.0.0.1"
    grpc_port: int = 9091
    http_port: int = 15014
    poll_interval: float = 0.5
    drain_seconds: float = 5.0
    check_fail_open: bool = False
    check_budget: float = 0.15
    # Rate-limit counters in Redis (shared by hubs); None keeps them in memory.
    ratelimit_redis: str | None = None
    ratelimit_redis_failure: str = "allow"
    ratelimit_redis_timeout: float = 0.015
    # Under load, how long a decision's write to Redis may wait to share it with others.
    ratelimit_redis_batch_wait: float = 0.002
    # istiod's debounce: a push waits for this much quiet after a change, at most push_max_delay.
    push_debounce: float = 0.1
    push_max_delay: float = 10.0
    # The mesh CA (--ca-dir): workload certificates over SDS and IstioCertificateService.
    ca: CAConfig | None = None


class Hub:
    def __init__(self, options: ServeOptions, registry: Registry) -> None:
        self.options = options
        self.registry = registry
        self.store = ConfigStore(options.config, registry, poll_interval=options.poll_interval)
        self.health = health_aio.HealthServicer()
        self.grpc = grpc.aio.server(
            options=[
                # Envoy sends headers that may be large; bound what one message may cost.
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._http: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.access_log = AccessLogService()
        self.rate_limit = RateLimitService(rate_limit_backend(options))
        self.authorization = AuthorizationService(
            FailurePolicy(options.check_fail_open, options.check_budget)
        )
        self.xds = SnapshotCache()
        # Loading the CA may raise ValueError (an unusable --ca-dir): the hub does not start.
        self.authority = Authority.from_config(options.ca) if options.ca is not None else None
        self.ca_server: CaServer | None = None
        self.pusher = Pusher(
            self.xds,
            # Without a CA no secrets are served: inbound listeners then stay plaintext unless
            # a PeerAuthentication demands STRICT (which fails closed).
            functools.partial(translate, certificates=self.authority is not None),
            quiet=options.push_debounce,
            max_delay=options.push_max_delay,
            secrets=None
            if self.authority is None or options.ca is None
            else SecretIssuer(self.authority, key_type=options.ca.workload_key_type),
        )
        self.xds.hooks = self.pusher
        self.ads = AggregatedDiscoveryService(self.xds)

    async def start(self) -> None:
        o = self.options
        self.grpc.add_generic_rpc_handlers(
            (self.authorization.generic_handler(), self.rate_limit.generic_handler())
        )
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log, self.grpc)
        self.ads.add_to_server(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (
                *_SERVICES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc.add_insecure_port(f"{o.address}:{o.grpc_port}")
        await self.grpc.start()

        if self.authority is not None and o.ca is not None and o.ca.port:
            tokens = (
                BootstrapTokens.from_file(o.ca.tokens_file, o.ca.trust_domain)
                if o.ca.tokens_file is not None
                else None
            )
            self.ca_server = await start_ca_server(self.authority, o.address, o.ca.port, tokens)
        if self.authority is not None and o.ca is not None and o.ca.extra_roots_file is not None:
            roots = watch_extra_roots(
                self.authority, o.ca.extra_roots_file, o.poll_interval, self.pusher.push_all
            )
            self._tasks.add(asyncio.ensure_future(roots))

        self._http = web.AppRunner(
            admin.application(self.store, self.registry, self.xds), access_log=None
        )
        await self._http.setup()
        await web.TCPSite(self._http, o.address, o.http_port).start()

        self.store.subscribe(self.authorization.activate)
        self.store.subscribe(self.access_log.activate)
        self.store.subscribe(self.rate_limit.activate)
        self.store.subscribe(self.pusher.activate)
        self.store.subscribe(self._on_snapshot)
        await self.store.load()
        # Everything made so far (modules, the compiled configuration) lives as long as the
        # process: out of the collector's sight, it is not scanned again on every collection
        # the request paths' short-lived objects trigger; and those collections run less often.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        self._watch = asyncio.create_task(self.store.run())
        log.info(
            "mixerhub serving gRPC on %s:%d and HTTP on %s:%d (config: %s)",
            o.address, o.grpc_port, o.address, o.http_port, ", ".join(o.config),
        )  # fmt: skip

    async def stop(self) -> None:
        log.info("draining for up to %.1fs", self.options.drain_seconds)
        await self.health.enter_graceful_shutdown()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.pusher.close()
        for task in self._tasks:
            task.cancel()
        # ADS streams never end on their own: close them so the drain does not wait them out.
        self.ads.close()
        await self.grpc.stop(self.options.drain_seconds)
        if self.ca_server is not None:
            await self.ca_server.stop(1.0)
        if self._http is not None:
            await self._http.cleanup()
        await self.rate_limit.close()
        await self.store.close()
        await jwks.default_cache().close()
        log.info("stopped")

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # A valid configuration is active: the services are SERVING (it stays so on later
        # rejections, since the last good configuration keeps serving).
        task = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status: int) -> None:
        for name in ("", *_SERVICES):
            await self.health.set(name, status)


def rate_limit_backend(options: ServeOptions) -> Backend | None:
    """The Redis backend when --ratelimit-redis is given, else None (the in-memory default)."""
    if options.ratelimit_redis is None:
        return None
    from mixerhub.ratelimit.redis import RedisBackend, describe

    log.info("rate-limit counters in Redis at %s", describe(options.ratelimit_redis))
    return RedisBackend.from_url(
        options.ratelimit_redis,
        timeout=options.ratelimit_redis_timeout,
        failure="deny" if options.ratelimit_redis_failure == "deny" else "allow",
        batch_wait=options.ratelimit_redis_batch_wait,
    )


async def run(options: ServeOptions, registry: Registry) -> int:
    try:
        hub = Hub(options, registry)
    except ValueError as e:  # a CA directory that cannot be used, with its file and reason
        log.error("cannot start: %s", e)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await hub.start()
    except Exception:
        log.exception("cannot start")
        await hub.stop()
        return 1
    await stop.wait()
    await hub.stop()
    return 0
