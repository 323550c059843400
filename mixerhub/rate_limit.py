"""envoy.service.ratelimit.v3.RateLimitService: Envoy's global rate-limit calls.

At this stage no limit is configured, so every descriptor is under its limit (envoyproxy/ratelimit
answers the same for a descriptor that matches no configured limit); quotas plug in here.
"""

from __future__ import annotations

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY

DECISIONS = Counter(
    "mixerhub_ratelimit_decisions",
    "ShouldRateLimit calls answered, by overall code.",
    ["code"],
    registry=REGISTRY,
)

_OK = rls_pb2.RateLimitResponse.Code.OK


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        DECISIONS.labels("OK").inc()
        return rls_pb2.RateLimitResponse(
            overall_code=_OK,
            statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(code=_OK)]
            * len(request.descriptors),
        )
