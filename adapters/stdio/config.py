"""stdio's params: Mixer's stdio adapter config (mixer/adapter/stdio/config/config.proto)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt

from mixerhub.types import Params

Level = Literal["INFO", "WARNING", "ERROR"]

# Mixer's default mapping of a logentry's severity to an output level.
DEFAULT_SEVERITY_LEVELS: dict[str, Level] = {
    **dict.fromkeys(("INFORMATIONAL", "informational", "INFO", "info"), "INFO"),
    **dict.fromkeys(("WARNING", "warning", "WARN", "warn"), "WARNING"),
    **dict.fromkeys(("ERROR", "error", "ERR", "err", "FATAL", "fatal"), "ERROR"),
}


class StdioParams(Params):
    log_stream: Literal["STDOUT", "STDERR"] = "STDOUT"
    severity_levels: dict[str, Level] = Field(default_factory=lambda: dict(DEFAULT_SEVERITY_LEVELS))
    metric_level: Level = "INFO"
    output_as_json: bool = True
    output_level: Level = "INFO"
    # When set, lines go to this file instead of log_stream, rotated by size and age.
    output_path: str = ""
    max_megabytes_before_rotation: NonNegativeInt = 100
    max_days_before_rotation: NonNegativeInt = 30
    max_rotated_files: NonNegativeInt = 1000
    # Lines waiting for the writer; past this, new lines are dropped and counted.
    queue_size: int = Field(default=10_000, gt=0)
