"""RateLimitRequest and RateLimitResponse in protobuf's wire format, read and written by hand.

ShouldRateLimit answers thousands of calls a second, each made of the same few pieces: a
domain, descriptors Envoy sends byte for byte the same every time, and statuses whose
current_limit and code are fixed by the configuration. Reading the request only down to its
descriptors' bytes lets those bytes key a cache of what each descriptor leads to
(rate_limit.py), and writing the response from cached pieces costs a join where protobuf
messages would cost a construction per field. Field numbers are those of
envoy/service/ratelimit/v3/rls.proto and envoy/extensions/common/ratelimit/v3/ratelimit.proto;
what this reader does not expect (unknown fields, a field number above 15) is left to protobuf's
own parser, so every request protobuf accepts is read the same.
"""

from __future__ import annotations

import functools

from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError

_Response = rls_pb2.RateLimitResponse
_U64 = (1 << 64) - 1

# Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
_DOMAIN, _DESCRIPTOR, _HITS = 0x0A, 0x12, 0x18  # RateLimitRequest 1, 2, 3
_CODE, _STATUS, _HEADER = 0x08, 0x12, 0x1A  # RateLimitResponse 1, 2, 3
_S_CODE, _S_LIMIT, _S_REMAINING, _S_RESET = 0x08, 0x12, 0x18, 0x22  # DescriptorStatus 1-4

OK, OVER_LIMIT = int(_Response.Code.OK), int(_Response.Code.OVER_LIMIT)


class MalformedRequest(ValueError):
    """The bytes are not a RateLimitRequest protobuf can read."""


def varint(n: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement, as protobuf does."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if 0 < n < 0x10000000:  # up to 268 million: limits and what remains of them
        if n < 0x200000:
            return bytes(((n & 0x7F) | 0x80, (n >> 7 & 0x7F) | 0x80, n >> 14))
        return bytes(((n & 0x7F) | 0x80, (n >> 7 & 0x7F) | 0x80, (n >> 14 & 0x7F) | 0x80, n >> 21))
    n &= _U64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise IndexError("varint too long")


def read_request(data: bytes) -> tuple[bytes, list[bytes], int]:
    """The request's domain, each descriptor's serialized bytes and hits_addend. The domain is
    not checked to be UTF-8 here: a known domain is, and the caller checks an unknown one."""
    try:
        return _read_fast(data)
    except (IndexError, _Unexpected):
        pass
    # Anything unusual (or broken): protobuf decides, and the descriptors are serialized again
    # (deterministically) to key the same caches.
    try:
        request = rls_pb2.RateLimitRequest.FromString(data)
    except DecodeError as e:
        raise MalformedRequest(str(e) or "cannot parse a RateLimitRequest") from None
    return (
        request.domain.encode(),
        [d.SerializeToString(deterministic=True) for d in request.descriptors],
        request.hits_addend,
    )


class _Unexpected(Exception):
    pass


def _read_fast(data: bytes) -> tuple[bytes, list[bytes], int]:
    domain, descriptors, hits = b"", [], 0
    i, n = 0, len(data)
    while i < n:
        tag = data[i]
        i += 1
        if tag in (_DOMAIN, _DESCRIPTOR):
            size = data[i]
            if size < 0x80:
                i += 1
            else:
                size, i = _read_varint(data, i)
            end = i + size
            if end > n:
                raise IndexError("truncated field")
            if tag == _DOMAIN:
                domain = data[i:end]
            else:
                descriptors.append(data[i:end])
            i = end
        elif tag == _HITS:
            hits, i = _read_varint(data, i)
            hits &= 0xFFFFFFFF  # uint32, as protobuf truncates it
        else:
            raise _Unexpected
    return domain, descriptors, hits


def field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return b"%c%s%s" % (tag, varint(len(payload)), payload)


def current_limit(rate_limit: rls_pb2.RateLimitResponse.RateLimit) -> bytes:
    """DescriptorStatus.current_limit, whole (tag and length included): made once per limit."""
    return field(_S_LIMIT, rate_limit.SerializeToString(deterministic=True))


def status(code: int, limit: bytes, remaining: int, reset_seconds: int) -> bytes:
    """One DescriptorStatus as a RateLimitResponse.statuses field."""
    # The hot path of every answer: single-byte varints are inlined.
    body = _CODE_FIELDS[code] + limit
    if remaining:
        body += _REMAINING_TAG + (_SMALL[remaining] if 0 < remaining < 0x80 else varint(remaining))
    body += _duration(reset_seconds)
    size = len(body)
    return _STATUS_TAG + (_SMALL[size] if size < 0x80 else varint(size)) + body


_CODE_FIELDS = {code: bytes((_S_CODE, code)) for code in (OK, OVER_LIMIT)}
_REMAINING_TAG, _STATUS_TAG = bytes((_S_REMAINING,)), bytes((_STATUS,))


@functools.lru_cache(maxsize=4096)
def _duration(seconds: int) -> bytes:
    """duration_until_reset: a Duration with only seconds (zero: an empty, present message)."""
    if not seconds:
        return b"%c\x00" % _S_RESET
    return field(_S_RESET, b"\x08" + varint(seconds))


def status_without_limit(code: int, remaining: int = 0) -> bytes:
    """A status with no current_limit: an unmatched descriptor, or an unlimited one."""
    body = b"%c%c" % (_S_CODE, code)
    if remaining:
        body += b"%c%s" % (_S_REMAINING, varint(remaining))
    return field(_STATUS, body)


def header(key: str, value: str) -> bytes:
    """A HeaderValue as a RateLimitResponse.response_headers_to_add field."""
    return field(_HEADER, field(0x0A, key.encode()) + field(0x12, value.encode()))


def response(code: int, statuses: list[bytes], headers: bytes = b"") -> bytes:
    return _OVERALL[code] + b"".join(statuses) + headers


_OVERALL = {code: bytes((_CODE, code)) for code in (OK, OVER_LIMIT)}


_REMAINING_KEY = field(0x0A, b"RateLimit-Remaining")
_RESET_KEY = field(0x0A, b"RateLimit-Reset")


def limit_header(requests_per_unit: int) -> bytes:
    """The RateLimit-Limit header field of a limit: made once per limit."""
    return header("RateLimit-Limit", str(requests_per_unit))


def remaining_headers(remaining: int, reset_seconds: int) -> bytes:
    """The RateLimit-Remaining and RateLimit-Reset header fields."""
    return _value_header(_REMAINING_KEY, remaining) + _reset_header(reset_seconds)


def _value_header(key: bytes, value: int) -> bytes:
    digits = b"%d" % value  # a header value is short: every length below is one byte
    return b"\x1a%c%s\x12%c%s" % (len(key) + 2 + len(digits), key, len(digits), digits)


@functools.lru_cache(maxsize=4096)
def _reset_header(reset_seconds: int) -> bytes:
    return _value_header(_RESET_KEY, reset_seconds)
