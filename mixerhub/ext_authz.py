"""envoy.service.auth.v3.Authorization: Envoy's external authorization calls.

At this stage every request is allowed: the policy dispatcher (Mixer check rules, JWT,
AuthorizationPolicy) plugs in here. The service is already wired so Envoy's ext_authz filter,
with failure_mode_allow false, finds the hub in the path from day one.
"""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY

CHECKS = Counter(
    "mixerhub_check", "ext_authz Check calls answered, by result.", ["result"], registry=REGISTRY
)

_ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
)


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        CHECKS.labels("ok").inc()
        return _ALLOW
