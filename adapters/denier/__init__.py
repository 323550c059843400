"""denier: always denies, with a configured status (Mixer's denier adapter)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from pydantic import Field, field_validator

from mixerhub import adapter
from mixerhub.adapter import (
    AdapterInfo,
    CheckResult,
    Env,
    Handler,
    InstanceSpec,
    QuotaArgs,
    QuotaResult,
)
from mixerhub.templates import CheckNothingInstance, ListEntryInstance, QuotaInstance
from mixerhub.types import Duration, Params

# google.rpc.Code names, accepted where configs write a code by name.
_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip


class Status(Params):
    """google.rpc.Status: the code (number or name) and message of the denial."""

    code: int = adapter.FAILED_PRECONDITION
    message: str = ""
    details: list[object] = Field(default_factory=list)

    @field_validator("code", mode="before")
    @classmethod
    def _code(cls, value: object) -> object:
        if isinstance(value, str) and value.upper() in _CODES:
            return _CODES[value.upper()]
        return value

    @field_validator("code")
    @classmethod
    def _known(cls, value: int) -> int:
        if value not in _CODES.values():
            raise ValueError(f"not a google.rpc.Code: {value} (0 to 16)")
        return value


class DenierParams(Params):
    # Mixer's defaults: FAILED_PRECONDITION, cacheable for 5 s or 1000 uses.
    status: Status = Field(default_factory=Status)
    valid_duration: Duration = timedelta(seconds=5)
    valid_use_count: int = Field(default=1000, ge=0)


class DenierHandler(Handler):
    def __init__(self, params: DenierParams) -> None:
        # The answer never changes, so it is made once.
        self._result = CheckResult(
            params.status.code,
            params.status.message,
            params.valid_duration.total_seconds(),
            params.valid_use_count,
        )
        self._quota = QuotaResult(0, params.valid_duration.total_seconds())

    async def handle_checknothing(self, instance: CheckNothingInstance) -> CheckResult:
        return self._result

    async def handle_listentry(self, instance: ListEntryInstance) -> CheckResult:
        return self._result

    async def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        return self._quota


def build(params: DenierParams, instances: Mapping[str, InstanceSpec], env: Env) -> DenierHandler:
    return DenierHandler(params)


INFO = AdapterInfo(
    name="denier",
    description="Rejects any check and quota request with a configurable error",
    templates=("checknothing", "listentry", "quota"),
    params=DenierParams,
    build=build,
)
