"""The hub's HTTP port (15014, Istio's monitoring port): metrics, health and debug pages."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixerhub import __version__
from mixerhub.monitoring import REGISTRY
from mixerhub.registry import Registry
from mixerhub.store.watch import ConfigStore

_STORE = web.AppKey("store", ConfigStore)
_REGISTRY = web.AppKey("registry", Registry)


def application(store: ConfigStore, registry: Registry) -> web.Application:
    app = web.Application()
    app[_STORE] = store
    app[_REGISTRY] = registry
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/configz", configz)
    app.router.add_get("/debug/adapters", adapters)
    return app


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready once a valid configuration is active (a rejected reload leaves the hub ready)."""
    if request.app[_STORE].snapshot is None:
        return web.Response(status=503, text="no valid configuration loaded yet\n")
    return web.Response(text="ready\n")


async def configz(request: web.Request) -> web.Response:
    store = request.app[_STORE]
    body: dict[str, Any] = {
        "version": __version__,
        "paths": store.paths,
        "active": store.snapshot.configz() if store.snapshot else None,
        "rejected": None,
    }
    if store.rejected is not None:
        body["rejected"] = {
            "at": store.rejected.at.isoformat(),
            "digest": store.rejected.digest,
            "errors": [e.as_json() | {"message": str(e)} for e in store.rejected.errors],
        }
    return _json(body)


async def adapters(request: web.Request) -> web.Response:
    registry, store = request.app[_REGISTRY], request.app[_STORE]
    built: dict[str, list[str]] = {}
    if store.snapshot is not None:
        for h in store.snapshot.handlers.values():
            if h.handler is not None:
                built.setdefault(h.adapter.name, []).append(h.name)
    return _json(
        {
            "adapters": [
                {
                    "name": info.name,
                    "description": info.description,
                    "templates": list(info.templates),
                    "defaultParams": info.default_params,
                    "handlers": built.get(info.name, []),
                }
                for info in registry.adapters.values()
            ],
            "problems": list(registry.problems),
        }
    )


def _json(body: object) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2, default=str) + "\n", content_type="application/json"
    )
