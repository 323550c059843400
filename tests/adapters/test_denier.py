"""denier: a fixed denial, made from its params."""

from __future__ import annotations

import logging

import pytest
from mixerhub.adapters.denier import INFO, DenierHandler, DenierParams
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mixerhub.adapter import CheckResult, Env, QuotaArgs
from mixerhub.templates import CheckNothingInstance, ListEntryInstance, QuotaInstance


def build(**params: object) -> DenierHandler:
    env = Env("denier", "d", logging.getLogger("test"), CollectorRegistry())
    handler = INFO.build(DenierParams.model_validate(params), {}, env)
    assert isinstance(handler, DenierHandler)
    return handler


async def test_defaults_are_mixers() -> None:
    result = await build().handle_checknothing(CheckNothingInstance("i"))
    assert result == CheckResult(9, "", 5.0, 1000)  # FAILED_PRECONDITION, 5s, 1000 uses


async def test_configured_status_for_every_check_template_and_no_quota() -> None:
    h = build(
        status={"code": "PERMISSION_DENIED", "message": "Not allowed"},
        validDuration="1m",
        valid_use_count=3,
    )
    expected = CheckResult(7, "Not allowed", 60.0, 3)
    assert await h.handle_checknothing(CheckNothingInstance("i")) == expected
    assert await h.handle_listentry(ListEntryInstance("i", "x")) == expected
    quota = await h.handle_quota(QuotaInstance("q"), QuotaArgs(amount=5))
    assert quota.amount == 0


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"status": {"code": 42}}, ("status", "code")),
        ({"validDuration": "soon"}, ("validDuration",)),
        ({"valid_use_count": -1}, ("valid_use_count",)),  # named as written
        ({"colour": "red"}, ("colour",)),
    ],
)
def test_bad_params_name_the_field(params: dict[str, object], where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        DenierParams.model_validate(params)
    assert tuple(str(p) for p in e.value.errors()[0]["loc"]) == where
