"""Quota and rate-limit algorithms, shared by the quota adapters and the rate-limit service."""

from mixerhub.quota.windows import Clock, FixedWindow, RollingWindow, Take, TokenBucket

__all__ = ["Clock", "FixedWindow", "RollingWindow", "Take", "TokenBucket"]
