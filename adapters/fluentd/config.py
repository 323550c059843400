"""fluentd's params: Mixer 1.4's fluentd adapter config (mixer/adapter/fluentd/config/config.proto).

Mixer's own fields load unchanged. Its queue and push settings (``instanceBufferSize``,
``pushIntervalDuration``, ``pushTimeoutDuration``) are the hub's ``batching`` settings under their
Mixer names: when one is set it wins, and setting it and its ``batching`` twin at once is an
error rather than a silent choice.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import Field

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.batching import BatchParams
from mixerhub.types import Duration, Params

DEFAULT_ADDRESS = "localhost:24224"
# Mixer's default for maxBatchSizeBytes (fluentd.go, defaultMaxBatchBytes).
DEFAULT_MAX_BATCH_SIZE_BYTES = 8 * 1024 * 1024

_ZERO = datetime.timedelta(0)


class FluentdParams(Params):
    # host:port of the Fluentd daemon (in_forward).
    address: str = DEFAULT_ADDRESS
    # Durations as whole milliseconds instead of Go strings ("1.5ms").
    integer_duration: bool = False
    # Mixer's queue of entries awaiting the push goroutine; 0 keeps batching.queueSize.
    instance_buffer_size: int = Field(default=0, ge=0)
    # The most bytes of encoded entries in one Forward message; a bigger entry is dropped.
    # 0 means the default (8 MiB), as in Mixer.
    max_batch_size_bytes: int = Field(default=DEFAULT_MAX_BATCH_SIZE_BYTES, ge=0)
    # How often queued entries are pushed; 0 keeps batching.flushInterval (Mixer's was 1m).
    push_interval_duration: Duration = _ZERO
    # How long one push may take; 0 keeps batching.timeout (Mixer's was 1m).
    push_timeout_duration: Duration = _ZERO
    # Not in Mixer. Ask in_forward to acknowledge each message (the "chunk" option), so that a
    # message lost with a dying connection is sent again instead of silently gone.
    require_ack: bool = True
    # Not in Mixer: the Forward protocol carrier mode (Mixer's Go logger sent Message mode).
    mode: Literal["Forward", "PackedForward"] = "Forward"
    batching: BatchParams = Field(default_factory=BatchParams)

    @property
    def effective_batching(self) -> BatchParams:
        """``batching`` with Mixer's queue and push settings applied where they are set."""
        changes: dict[str, object] = {}
        if self.instance_buffer_size:
            changes["queue_size"] = self.instance_buffer_size
        if self.push_interval_duration > _ZERO:
            changes["flush_interval"] = self.push_interval_duration
        if self.push_timeout_duration > _ZERO:
            changes["timeout"] = self.push_timeout_duration
        return self.batching.model_copy(update=changes) if changes else self.batching

    @property
    def max_message_bytes(self) -> int:
        return self.max_batch_size_bytes or DEFAULT_MAX_BATCH_SIZE_BYTES

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = split_address(self.address)
        if isinstance(port, str):  # validate() refuses such an address before any build
            raise ValueError(f"address {self.address!r} is malformed: {port}")
        return host, port


def split_address(address: str) -> tuple[str, int | str]:
    """Go's net.SplitHostPort, then the port as a number: (host, port) or ("", reason)."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return "", "missing port in address"
    if host.startswith("["):
        if not host.endswith("]"):
            return "", "missing ']' in address"
        host = host[1:-1]
    elif ":" in host:
        return "", "too many colons in address"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "", f"port {port!r} is not a number from 1 to 65535"
    return host, int(port)


# Mixer's name -> the batching field it stands for.
_TWINS = {
    "instance_buffer_size": "queue_size",
    "push_interval_duration": "flush_interval",
    "push_timeout_duration": "timeout",
}


def validate(params: FluentdParams, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    """Mixer's checks (fluentd.go, builder.Validate) and the hub's own."""
    if not params.address:
        yield FieldError("address", "Address is empty")
    else:
        _, port = split_address(params.address)
        if isinstance(port, str):
            yield FieldError("address", f"Address is malformed: {port}")
    for mixer_name, batching_name in _TWINS.items():
        if getattr(params, mixer_name) and batching_name in params.batching.model_fields_set:
            yield FieldError(
                _camel(mixer_name),
                f"set together with batching.{_camel(batching_name)}; set one of them",
            )


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)
