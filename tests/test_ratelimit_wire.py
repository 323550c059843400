"""ShouldRateLimit's own wire format: requests read by hand as protobuf reads them, statuses
written byte for byte as protobuf writes them, garbage refused with INVALID_ARGUMENT over a real
gRPC server, and descriptor plans dropped with the configuration that made them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from mixerhub.rate_limit import RateLimitService
from mixerhub.ratelimit import wire
from mixerhub.ratelimit.backend import MemoryBackend
from tests.harness import LOOPBACK, free_port
from tests.test_ratelimit import SERVICE, Clock, ask, compile_texts, descriptor

Response = rls_pb2.RateLimitResponse
OK, OVER = Response.Code.OK, Response.Code.OVER_LIMIT
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def _by_protobuf(data: bytes) -> tuple[bytes, list[bytes], int]:
    r = rls_pb2.RateLimitRequest.FromString(data)
    return (
        r.domain.encode(),
        [d.SerializeToString(deterministic=True) for d in r.descriptors],
        r.hits_addend,
    )


def _request(domain: str, *descriptors: ratelimit_pb2.RateLimitDescriptor, hits: int = 0) -> bytes:
    return rls_pb2.RateLimitRequest(
        domain=domain, descriptors=descriptors, hits_addend=hits
    ).SerializeToString()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _request("svc", descriptor(("user", "a"))),
        _request("d" * 300, descriptor(("k", "v" * 200), ("x", "é")), hits=2**32 - 1),
        _request("svc", descriptor(("user", "a")), descriptor(), hits=7),
        # An unknown field (number 9, a varint): protobuf skips it, and so must we.
        _request("svc", descriptor(("user", "a"))) + b"\x48\x05",
        # A field repeated: the last value wins, as protobuf's merge does.
        _request("first", descriptor(("a", "b")), hits=3) + _request("second", hits=4),
    ],
)
def test_requests_are_read_as_protobuf_reads_them(data: bytes) -> None:
    assert wire.read_request(data) == _by_protobuf(data)


@pytest.mark.parametrize(
    "n",
    [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455, 268_435_456, 2**63 - 1, -1],
)
def test_varints_are_protobufs(n: int) -> None:
    message = Response.DescriptorStatus(duration_until_reset=duration_pb2.Duration(seconds=n))
    # seconds (int64) is the only field of the Duration: tag 0x08, then the varint.
    serialized = message.duration_until_reset.SerializeToString()
    assert (b"\x08" + wire.varint(n) if n else b"") == serialized


def test_hits_addend_keeps_protobufs_uint32_truncation() -> None:
    # hits_addend 2**32 + 5 written as a varint: protobuf reads uint32 5.
    data = b"\x0a\x01d\x18" + wire.varint(2**32 + 5)
    assert wire.read_request(data) == _by_protobuf(data) == (b"d", [], 5)


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\xff\xff\xff", b"\x12\x80"])
def test_garbage_is_a_malformed_request(data: bytes) -> None:
    with pytest.raises(wire.MalformedRequest):
        wire.read_request(data)


@pytest.mark.parametrize("remaining", [0, 1, 127, 128, 16_383, 16_384, 99_999_999, 2**32 - 1])
@pytest.mark.parametrize("reset", [0, 1, 59, 300, 31_536_000, -1])
@pytest.mark.parametrize("code", [OK, OVER])
def test_statuses_are_written_byte_for_byte_as_protobuf_writes_them(
    code: int, remaining: int, reset: int
) -> None:
    limit = Response.RateLimit(
        name="per-user", requests_per_unit=100, unit=Response.RateLimit.MINUTE
    )
    expected = Response(
        overall_code=code,
        statuses=[
            Response.DescriptorStatus(
                code=code,
                current_limit=limit,
                limit_remaining=remaining,
                duration_until_reset=duration_pb2.Duration(seconds=reset),
            ),
            Response.DescriptorStatus(code=OK),
        ],
    )
    ours = wire.response(
        code,
        [
            wire.status(code, wire.current_limit(limit), remaining, reset),
            wire.status_without_limit(OK),
        ],
    )
    assert ours == expected.SerializeToString(deterministic=True)


async def test_the_answer_carries_every_status_and_the_tightest_headers() -> None:
    s = RateLimitService(MemoryBackend(Clock(1230.0)))
    s.activate(compile_texts(SERVICE))
    override = descriptor(("tenant", "o"))
    override.limit.requests_per_unit, override.limit.unit = 1, Response.RateLimit.HOUR
    data = _request(
        "svc",
        descriptor(("nothing", "x")),
        descriptor(("internal", "i")),
        descriptor(("tenant", "t")),
        override,
    )
    r = Response.FromString(await s.should_rate_limit_bytes(data, None))
    assert r.overall_code == OK
    assert [st.HasField("current_limit") for st in r.statuses] == [False, False, True, True]
    assert r.statuses[1].limit_remaining == 2**32 - 1
    assert (r.statuses[2].limit_remaining, r.statuses[2].duration_until_reset.seconds) == (4, 30)
    assert r.statuses[3].current_limit == Response.RateLimit(
        requests_per_unit=1, unit=Response.RateLimit.HOUR
    )
    headers = [(h.key, h.value) for h in r.response_headers_to_add]
    assert headers == [
        ("RateLimit-Limit", "1"),
        ("RateLimit-Remaining", "0"),
        ("RateLimit-Reset", "2370"),
    ]
    r = Response.FromString(await s.should_rate_limit_bytes(data, None))
    assert (r.overall_code, [st.code for st in r.statuses]) == (OVER, [OK, OK, OK, OVER])


@pytest.fixture
async def server() -> AsyncIterator[tuple[RateLimitService, grpc.aio.Channel]]:
    s = RateLimitService(MemoryBackend(Clock()))
    s.activate(compile_texts(SERVICE))
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((s.generic_handler(),))
    port = free_port()
    grpc_server.add_insecure_port(f"{LOOPBACK}:{port}")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    try:
        yield s, channel
    finally:
        await channel.close()
        await grpc_server.stop(None)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",
        # A well-formed request whose descriptor is not one.
        b"\x0a\x03svc\x12\x03\x0a\x05x",
        # A domain that is not UTF-8 (read_request leaves that to the service).
        b"\x0a\x02\xff\xfe\x12\x00",
    ],
)
async def test_garbage_over_grpc_is_invalid_argument_and_the_server_keeps_serving(
    server: tuple[RateLimitService, grpc.aio.Channel], garbage: bytes
) -> None:
    _, channel = server
    call = channel.unary_unary(METHOD)  # bytes in, bytes out
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(garbage, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed RateLimitRequest" in (e.value.details() or "")
    answer = Response.FromString(await call(_request("svc", descriptor(("user", "a"))), timeout=5))
    assert answer.overall_code == OK
    assert answer.statuses[0].current_limit.requests_per_unit == 2


async def test_a_configuration_change_drops_the_descriptor_plans() -> None:
    s = RateLimitService(MemoryBackend(Clock()))
    s.activate(compile_texts(SERVICE))
    r = await ask(s, "svc", [("user", "a")])
    assert r.statuses[0].current_limit.requests_per_unit == 2
    plans = s.plans("svc")
    assert plans is not None
    assert len(plans.known) == 1
    s.activate(compile_texts(SERVICE.replace("requests_per_unit: 2", "requests_per_unit: 7")))
    fresh = s.plans("svc")
    assert fresh is not None
    assert fresh is not plans
    assert not fresh.known
    r = await ask(s, "svc", [("user", "a")])
    assert r.statuses[0].current_limit.requests_per_unit == 7
    assert r.statuses[0].limit_remaining == 5  # the count (1 hit) survived the reload
    # A domain removed by the change is answered OK, without limits, at once.
    s.activate(compile_texts(SERVICE.replace("domain: svc", "domain: other")))
    r = await ask(s, "svc", [("user", "a")])
    assert r.overall_code == OK
    assert not r.statuses[0].HasField("current_limit")
