"""The hub's HTTP port (15014, Istio's monitoring port): metrics, health and debug pages."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mixerhub import __version__
from mixerhub.monitoring import REGISTRY
from mixerhub.registry import Registry
from mixerhub.store.watch import ConfigStore
from mixerhub.xds import status
from mixerhub.xds.cache import SnapshotCache

_STORE = web.AppKey("store", ConfigStore)
_REGISTRY = web.AppKey("registry", Registry)
_XDS = web.AppKey("xds", SnapshotCache)


def application(
    store: ConfigStore, registry: Registry, xds: SnapshotCache | None = None
) -> web.Application:
    app = web.Application()
    app[_STORE] = store
    app[_REGISTRY] = registry
    app[_XDS] = xds if xds is not None else SnapshotCache()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/configz", configz)
    app.router.add_get("/debug/adapters", adapters)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/config_dump", config_dump)
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


async def syncz(request: web.Request) -> web.Response:
    """Every connected proxy and, per xDS type, the version sent, acknowledged or rejected."""
    return _json(status.syncz(request.app[_XDS]))


async def config_dump(request: web.Request) -> web.Response:
    """What the hub serves one proxy (``?proxy=NODE_ID``), resources as Envoy's JSON."""
    node_id = request.query.get("proxy", "")
    if not node_id:
        return web.Response(status=400, text="which proxy? /debug/config_dump?proxy=NODE_ID\n")
    snapshot = request.app[_XDS].get_snapshot(node_id)
    if snapshot is None:
        return web.Response(status=404, text=f"no configuration for proxy {node_id!r}\n")
    return _json(
        {
            "node_id": node_id,
            "versions": dict(snapshot.versions),
            "resources": {
                type_url: [
                    _redacted(json_format.MessageToDict(packed)) for packed in by_name.values()
                ]
                for type_url, by_name in snapshot.packed.items()
            },
        }
    )


def _redacted(resource: dict[str, Any]) -> dict[str, Any]:
    """A secret without its private key: a debug page is no place for one (Envoy's own
    config_dump redacts them too)."""
    certificate = resource.get("tlsCertificate")
    if isinstance(certificate, dict) and "privateKey" in certificate:
        certificate["privateKey"] = {"inlineString": "[redacted]"}
    return resource


def _json(body: object) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2, default=str) + "\n", content_type="application/json"
    )
