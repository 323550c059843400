"""The ``RateLimitConfig`` kind: envoyproxy/ratelimit's YAML, unchanged, compiled into a matcher.

A bare ``{domain, descriptors}`` file loads as this kind (mixerhub.store.documents). The fields
and their checks follow envoyproxy/ratelimit (src/config/config_impl.go): unknown fields, an
empty key, a key/value twice at one level, an unknown unit and a unit on an unlimited limit are
errors. Two stricter checks: ``requests_per_unit`` is required unless the limit is unlimited
(envoyproxy/ratelimit silently reads a missing one as 0, denying everything), and two files
for one domain are an error (as envoyproxy/ratelimit without MERGE_DOMAIN_CONFIG). One field is
mixerhub's own: ``algorithm`` per limit (fixed_window, as envoyproxy/ratelimit, by default).
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mixerhub.ratelimit.matching import Algorithm, Domain, Entry, Level, Limit, Node, Unit
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import RATELIMIT_API_VERSION, RATELIMIT_KIND, Document
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind, split_api_version

__all__ = ["RATE_LIMIT_CONFIG", "RateLimitConfigSpec"]


def _lower(value: object) -> object:
    # envoyproxy/ratelimit upper-cases the unit before looking it up in Envoy's enum.
    return value.lower() if isinstance(value, str) else value


def _text(value: object) -> object:
    # YAML reads `value: 50` or `value: true` as a number or boolean; Envoy sends strings.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replace(_Spec):
    name: str


class RateLimitSpec(_Spec):
    requests_per_unit: int | None = Field(default=None, ge=0)
    unit: Annotated[Unit, BeforeValidator(_lower)] | None = None
    name: str = ""
    unlimited: bool = False
    replaces: list[Replace] | None = None
    algorithm: Algorithm = "fixed_window"


class DescriptorSpec(_Spec):
    key: str
    value: Annotated[str, BeforeValidator(_text)] | None = None
    rate_limit: RateLimitSpec | None = None
    shadow_mode: bool = False
    detailed_metric: bool = False
    descriptors: list[DescriptorSpec] | None = None


class RateLimitConfigSpec(_Spec):
    domain: str
    descriptors: list[DescriptorSpec] | None = None


def compile_rate_limit_config(doc: Document, spec: RateLimitConfigSpec, c: Compilation) -> None:
    errors = len(c.errors)
    if not spec.domain:
        c.error(doc, "spec.domain", "must not be empty")
        return
    first = c.rate_limits.get(spec.domain)
    if first is not None:
        c.error(doc, "spec.domain", f"domain {spec.domain!r} is already defined in {first.source}")
        return
    level = _level(doc, c, spec.descriptors or [], ("spec", "descriptors"), "")
    if len(c.errors) == errors:
        c.rate_limits[spec.domain] = Domain(spec.domain, level, f"{doc.file}: document {doc.index}")


def _level(
    doc: Document,
    c: Compilation,
    descriptors: list[DescriptorSpec],
    path: tuple[str | int, ...],
    parent: str,
) -> Level:
    exact: dict[Entry, Node] = {}
    wildcards: dict[str, list[tuple[str, Node]]] = {}
    any_value: dict[str, Node] = {}
    seen: set[tuple[str, str | None]] = set()
    for i, d in enumerate(descriptors):
        here = (*path, i)
        if not d.key:
            c.error(doc, join_path(*here, "key"), "must not be empty")
            continue
        if (d.key, d.value) in seen:
            what = d.key if d.value is None else f"{d.key}={d.value}"
            c.error(doc, join_path(*here), f"duplicate descriptor {what} at this level")
            continue
        seen.add((d.key, d.value))
        stat = d.key if d.value is None else f"{d.key}_{d.value}"
        stat = f"{parent}.{stat}" if parent else stat
        node = Node(
            _limit(doc, c, d, (*here, "rate_limit"), stat),
            _level(doc, c, d.descriptors or [], (*here, "descriptors"), stat),
        )
        if d.value is None:
            any_value[d.key] = node
        elif d.value.endswith("*"):
            wildcards.setdefault(d.key, []).append((d.value[:-1], node))
        else:
            exact[(d.key, d.value)] = node
    return Level(exact, {k: tuple(v) for k, v in wildcards.items()}, any_value)


def _limit(
    doc: Document, c: Compilation, d: DescriptorSpec, path: tuple[str | int, ...], stat: str
) -> Limit | None:
    r = d.rate_limit
    if r is None:
        return None
    ok = True
    if r.unlimited:
        if r.unit is not None:
            c.error(doc, join_path(*path, "unit"), "must not be set when the limit is unlimited")
            ok = False
    else:
        if r.unit is None:
            c.error(doc, join_path(*path, "unit"), "required field is missing (or set unlimited)")
            ok = False
        if r.requests_per_unit is None:
            c.error(
                doc,
                join_path(*path, "requests_per_unit"),
                "required field is missing (or set unlimited)",
            )
            ok = False
    replaces = frozenset(x.name for x in r.replaces or ())
    for j, x in enumerate(r.replaces or ()):
        if not x.name:
            c.error(doc, join_path(*path, "replaces", j, "name"), "must not be empty")
            ok = False
        elif x.name == r.name:
            c.error(doc, join_path(*path, "replaces", j, "name"), "a limit cannot replace itself")
            ok = False
    if not ok:
        return None
    return Limit(
        requests_per_unit=r.requests_per_unit or 0,
        unit=r.unit or "second",
        name=r.name,
        algorithm=r.algorithm,
        unlimited=r.unlimited,
        shadow_mode=d.shadow_mode,
        detailed_metric=d.detailed_metric,
        replaces=replaces,
        path=stat,
    )


_GROUP, _VERSION = split_api_version(RATELIMIT_API_VERSION)

RATE_LIMIT_CONFIG: Final = Kind(
    _GROUP, (_VERSION,), RATELIMIT_KIND, RateLimitConfigSpec, 50, compile_rate_limit_config
)
