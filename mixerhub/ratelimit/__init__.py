"""Envoy's global rate limits: envoyproxy/ratelimit's configuration, its matcher and backends.

``matching`` holds what a snapshot carries (the compiled descriptor trees), ``config`` the
``RateLimitConfig`` kind that compiles them, ``backend`` the counters behind the limits. The
gRPC service that answers Envoy is mixerhub.rate_limit.
"""
