"""Evaluation cost of typical rule and dimension expressions: mixerhub's compiler against
cel-expr-python (the official CEL implementation), measured side by side in one run.

    python bench/expr.py [--seconds 0.05]

For each expression it prints ns per evaluation for mixerhub, for CEL given the bag as a dict
(``eval(data=bag)``, what one request costs) and for CEL given a prebuilt Activation (the best case,
if one activation served every expression of a request), and the ratios to mixerhub. Both engines
return a Python value: CEL's includes ``.value()``.

CEL has no ``|``, ``match`` or Mixer's ``conditional``; each CEXL expression is paired with the CEL
that computes the same value on this bag (``a | "d"`` on a map entry becomes ``"k" in m ? m["k"] :
"d"``; on a top-level attribute, which CEL cannot test for presence, just the attribute).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

from cel_expr_python import cel

from mixerhub.attributes import ValueType
from mixerhub.expression import compile_expression

V = ValueType

ATTRIBUTES = {
    **dict.fromkeys(
        (
            "destination.service.host",
            "destination.service.name",
            "destination.workload.name",
            "source.workload.name",
            "source.principal",
            "request.path",
            "request.host",
            "request.method",
            "request.useragent",
            "context.protocol",
            "context.reporter.kind",
            "api.protocol",
        ),
        V.STRING,
    ),
    **dict.fromkeys(("request.headers", "source.labels", "destination.labels"), V.STRING_MAP),
    **dict.fromkeys(("response.code", "request.size", "response.size"), V.INT64),
    "response.duration": V.DURATION,
    "request.time": V.TIMESTAMP,
    "connection.mtls": V.BOOL,
    "source.ip": V.IP_ADDRESS,  # CEL has no IP type: only mixerhub sees it
}

CEL_TYPES = {
    V.STRING: cel.Type.STRING,
    V.INT64: cel.Type.INT,
    V.BOOL: cel.Type.BOOL,
    V.DURATION: cel.Type.DURATION,
    V.TIMESTAMP: cel.Type.TIMESTAMP,
    V.STRING_MAP: cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
}

BAG: dict[str, object] = {
    "destination.service.host": "ratings.default.svc.cluster.local",
    "destination.service.name": "ratings",
    "destination.workload.name": "ratings-v1",
    "destination.labels": {"app": "ratings", "version": "v1"},
    "source.workload.name": "reviews-v3",
    "source.principal": "cluster.local/ns/default/sa/bookinfo-reviews",
    "source.labels": {"app": "reviews", "version": "v3", "pod-template-hash": "5f8b"},
    "source.ip": ipaddress.ip_address("10.44.0.12"),
    "request.path": "/api/v1/ratings/0",
    "request.host": "ratings:9080",
    "request.method": "GET",
    "request.useragent": "Envoy/HC",
    "request.headers": {
        ":authority": "ratings:9080",
        "user-agent": "curl/7.64.0",
        "x-request-id": "7c0a7e2b-5d2f-4a54-9d6c-1f0b2f5f6c33",
        "x-user": "john",
        "accept": "*/*",
    },
    "request.size": 0,
    "request.time": datetime.datetime(2019, 11, 14, 12, 0, tzinfo=datetime.UTC),
    "response.code": 200,
    "response.size": 48,
    "response.duration": datetime.timedelta(microseconds=1830),
    "context.protocol": "http",
    "context.reporter.kind": "outbound",
    "api.protocol": "http",
    "connection.mtls": True,
}

# (CEXL, CEL computing the same value on BAG)
EXPRESSIONS: list[tuple[str, str]] = [
    (
        'destination.service.host == "ratings.default.svc.cluster.local"'
        ' && source.labels["app"] == "reviews"',
        'destination.service.host == "ratings.default.svc.cluster.local"'
        ' && source.labels["app"] == "reviews"',
    ),
    (
        'request.headers["user-agent"] | "unknown"',
        '"user-agent" in request.headers ? request.headers["user-agent"] : "unknown"',
    ),
    (
        'conditional((context.reporter.kind | "inbound") == "outbound", "client", "server")',
        'context.reporter.kind == "outbound" ? "client" : "server"',
    ),
    ('match(request.path, "/api/*")', 'request.path.startsWith("/api/")'),
    (
        'context.protocol == "http" || context.protocol == "grpc"',
        'context.protocol == "http" || context.protocol == "grpc"',
    ),
    (
        '(context.protocol == "http" || context.protocol == "grpc")'
        ' && (match((request.useragent | "-"), "kube-probe*") == false)'
        ' && (match((request.useragent | "-"), "Prometheus*") == false)',
        '(context.protocol == "http" || context.protocol == "grpc")'
        ' && !request.useragent.startsWith("kube-probe")'
        ' && !request.useragent.startsWith("Prometheus")',
    ),
    (
        'destination.labels["app"] == "ratings" && source.labels["app"]=="reviews"'
        ' && source.labels["version"] == "v3"',
        'destination.labels["app"] == "ratings" && source.labels["app"]=="reviews"'
        ' && source.labels["version"] == "v3"',
    ),
    ('source.workload.name | "unknown"', "source.workload.name"),
    (
        'source.labels["version"] | "unknown"',
        '"version" in source.labels ? source.labels["version"] : "unknown"',
    ),
    (
        'destination.service.host | conditional((destination.service.name | "unknown")'
        ' == "unknown", "unknown", request.host)',
        "destination.service.host",
    ),
    ("response.code | 200", "response.code"),
    ('response.duration | "0ms"', "response.duration"),
    (
        'conditional((context.reporter.kind | "inbound") == "outbound", "unknown",'
        ' conditional(connection.mtls | false, "mutual_tls", "none"))',
        'context.reporter.kind == "outbound" ? "unknown"'
        ' : (connection.mtls ? "mutual_tls" : "none")',
    ),
    ('"^/api/v[0-9]+/".matches(request.path)', 'request.path.matches("^/api/v[0-9]+/")'),
    ('request.headers["x-user"] == "john"', 'request.headers["x-user"] == "john"'),
    (
        'request.method + " " + request.path',
        'request.method + " " + request.path',
    ),
]


def ns_per_call(fn: Callable[[], object], seconds: float) -> float:
    """Best of five runs, each about ``seconds`` long."""
    timer = timeit.Timer(fn)
    probe = 200
    number = max(1, int(probe * seconds / max(timer.timeit(probe), 1e-9)))
    return min(timer.repeat(repeat=5, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.05, help="length of one timing run")
    args = parser.parse_args()

    env = cel.NewEnv(variables={n: CEL_TYPES[t] for n, t in ATTRIBUTES.items() if t in CEL_TYPES})
    activation = env.Activation(data=BAG)
    print(f"{'mixerhub':>9} {'cel':>9} {'ratio':>6} {'cel act.':>9} {'ratio':>6}  expression")
    totals = [0.0, 0.0, 0.0]
    for ours_source, cel_source in EXPRESSIONS:
        ours = compile_expression(ours_source, ATTRIBUTES).evaluate
        program = env.compile(cel_source)
        ours_value, cel_value = ours(BAG), program.eval(data=BAG).value()
        if ours_value != cel_value:
            raise SystemExit(f"{ours_source}: mixerhub {ours_value!r} != CEL {cel_value!r}")

        ours_ns = ns_per_call(functools.partial(ours, BAG), args.seconds)
        cel_ns = ns_per_call(functools.partial(_cel_eval, program, data=BAG), args.seconds)
        act_ns = ns_per_call(functools.partial(_cel_eval, program, activation), args.seconds)
        for i, ns in enumerate((ours_ns, cel_ns, act_ns)):
            totals[i] += ns
        print(
            f"{ours_ns:9.0f} {cel_ns:9.0f} {cel_ns / ours_ns:5.1f}x {act_ns:9.0f}"
            f" {act_ns / ours_ns:5.1f}x  {_short(ours_source)}"
        )
    ours_total, cel_total, act_total = totals
    print(
        f"{ours_total:9.0f} {cel_total:9.0f} {cel_total / ours_total:5.1f}x {act_total:9.0f}"
        f" {act_total / ours_total:5.1f}x  total ({len(EXPRESSIONS)} expressions, ns)"
    )


def _cel_eval(program: cel.Expression, *args: object, **kwargs: object) -> object:
    return program.eval(*args, **kwargs).value()


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    main()
