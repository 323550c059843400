"""The `mixerhub` command: serve, validate, eval, adapters, bootstrap, version."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from mixerhub import __version__, bootstrap
from mixerhub.ca import cli as ca_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    code: int = args.run(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixerhub", description="Mixer's adapter model beside Envoy."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the hub")
    serve.add_argument(
        "--config",
        action="append",
        metavar="DIR",
        help="a configuration folder or file (repeatable); default: the shipped config/default",
    )
    serve.add_argument("--address", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--grpc-port", type=bootstrap.parse_port, default=9091)
    serve.add_argument("--http-port", type=bootstrap.parse_port, default=15014)
    serve.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between config file checks"
    )
    serve.add_argument(
        "--drain-seconds", type=float, default=5.0, help="time in-flight calls get on SIGTERM"
    )
    serve.add_argument(
        "--check-fail-open",
        action="store_true",
        help="allow requests when a check fails inside the hub (default: deny, like Mixer)",
    )
    serve.add_argument(
        "--check-budget",
        type=float,
        default=0.15,
        help="seconds a Check may take before the failure policy answers (Envoy waits 0.2)",
    )
    serve.add_argument(
        "--ratelimit-redis",
        metavar="URL",
        type=_redis_url,
        help="keep rate-limit counters in Redis, shared by every hub using it: redis://,"
        " rediss://, redis+sentinel://HOST:PORT[,...]/SERVICE or redis+cluster://HOST:PORT[,...];"
        " default: in memory",
    )
    serve.add_argument(
        "--ratelimit-redis-failure",
        choices=["allow", "deny"],
        default="allow",
        help="the rate-limit answer when Redis fails or is slow (default: allow, as Envoy)",
    )
    serve.add_argument(
        "--ratelimit-redis-timeout",
        type=float,
        default=0.015,
        help="seconds a rate-limit decision waits for Redis (Envoy waits 0.02)",
    )
    serve.add_argument(
        "--ratelimit-redis-batch-wait",
        type=float,
        default=0.002,
        help="under load, seconds a decision's write to Redis may wait for others to share it"
        " (0: never)",
    )
    serve.add_argument(
        "--push-debounce",
        type=float,
        default=0.1,
        help="seconds of quiet after a config change before xDS pushes it (istiod's 100 ms)",
    )
    serve.add_argument(
        "--push-max-delay",
        type=float,
        default=10.0,
        help="the longest a config change waits for quiet before it is pushed anyway",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ca_cli.add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    validate = sub.add_parser("validate", help="check configuration, print every error")
    validate.add_argument("paths", nargs="+", metavar="DIR|FILE")
    validate.set_defaults(run=_validate)

    ev = sub.add_parser("eval", help="compile and evaluate one expression")
    ev.add_argument("expression")
    ev.add_argument(
        "--attributes", default="{}", help='a JSON object, e.g. \'{"request.path": "/x"}\''
    )
    ev.set_defaults(run=_eval)

    adapters = sub.add_parser("adapters", help="list the registered adapters")
    adapters.set_defaults(run=_adapters)

    boot = sub.add_parser(
        "bootstrap", help="print an Envoy configuration wired to the hub (static, or --ads)"
    )
    bootstrap.add_arguments(boot)
    boot.set_defaults(run=_bootstrap)

    status = sub.add_parser(
        "proxy-status", help="every connected proxy's xDS sync state, like istioctl's"
    )
    _add_admin(status)
    status.set_defaults(run=_proxy_status)

    config = sub.add_parser("proxy-config", help="what the hub serves one proxy, like istioctl's")
    kinds = config.add_subparsers(dest="proxy_config", metavar="KIND", required=True)
    secret = kinds.add_parser("secret", help="the proxy's certificates (SDS)")
    secret.add_argument("node_id", metavar="NODE_ID")
    _add_admin(secret)
    secret.set_defaults(run=_proxy_config_secret)

    ca_cli.add_ca_command(sub)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(run=lambda args: print(f"mixerhub {__version__}") or 0)
    return parser


def _add_admin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default="127.0.0.1:15014",
        metavar="HOST:HTTP_PORT",
        help="the hub's HTTP port (default 127.0.0.1:15014)",
    )


def _redis_url(value: str) -> str:
    from mixerhub.ratelimit.redis import parse_url

    try:
        parse_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from mixerhub import registry, server
    from mixerhub.store.compile import default_config_dir

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    reg = registry.default_registry()
    for problem in reg.problems:
        logging.getLogger("mixerhub.registry").error("adapter left out: %s", problem)
    try:
        ca = ca_cli.config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = server.ServeOptions(
        config=args.config or [default_config_dir()],
        address=args.address,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        poll_interval=args.poll_interval,
        drain_seconds=args.drain_seconds,
        check_fail_open=args.check_fail_open,
        check_budget=args.check_budget,
        ratelimit_redis=args.ratelimit_redis,
        ratelimit_redis_failure=args.ratelimit_redis_failure,
        ratelimit_redis_timeout=args.ratelimit_redis_timeout,
        ratelimit_redis_batch_wait=args.ratelimit_redis_batch_wait,
        push_debounce=args.push_debounce,
        push_max_delay=args.push_max_delay,
        ca=ca,
    )
    return uvloop.run(server.run(options, reg))


def _validate(args: argparse.Namespace) -> int:
    from mixerhub import registry
    from mixerhub.store import documents
    from mixerhub.store.compile import Rejected, compile_snapshot

    source = documents.read(args.paths)
    try:
        snapshot = compile_snapshot(source, registry.default_registry(), build_handlers=False)
    except Rejected as e:
        for error in e.errors:
            print(error)
        print(f"{len(e.errors)} error(s) in {len(source.files)} file(s)", file=sys.stderr)
        return 1
    print(
        f"valid: {len(source.documents)} documents in {len(source.files)} files"
        f" ({len(snapshot.rules)} rules, {len(snapshot.instances)} instances,"
        f" {len(snapshot.handlers)} handlers)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mixerhub.attributes import format_value, from_json
    from mixerhub.expression import EvaluationError, ExpressionError, compile_expression
    from mixerhub.store.compile import builtin_attributes

    types = builtin_attributes()
    try:
        raw = json.loads(args.attributes)
        if not isinstance(raw, dict):
            raise ValueError("--attributes must be a JSON object")
        bag = {}
        for name, value in raw.items():
            if name not in types:
                raise ValueError(f"unknown attribute {name!r}")
            bag[name] = from_json(value, types[name])
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        print(f"error: --attributes: {e}", file=sys.stderr)
        return 1
    try:
        expr = compile_expression(args.expression, types)
    except ExpressionError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"  {args.expression}\n  {' ' * e.position}^", file=sys.stderr)
        return 1
    try:
        value = expr.evaluate(bag)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(format_value(value)))
    return 0


def _adapters(args: argparse.Namespace) -> int:
    from mixerhub import registry

    reg = registry.default_registry()
    width = max((len(name) for name in reg.adapters), default=0)
    for info in reg.adapters.values():
        print(f"{info.name:<{width}}  {','.join(info.templates):<30}  {info.description}")
    for problem in reg.problems:
        print(f"left out: {problem}", file=sys.stderr)
    return 0


def _proxy_status(args: argparse.Namespace) -> int:
    from mixerhub import proxy_status

    try:
        rows = proxy_status.fetch(args.admin)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(proxy_status.render(rows))
    return 0


def _proxy_config_secret(args: argparse.Namespace) -> int:
    from mixerhub import proxy_config

    try:
        dump, state = proxy_config.fetch(args.admin, args.node_id)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(proxy_config.render(proxy_config.secret_rows(dump, state)))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    try:
        if args.ads:
            text = bootstrap.render_ads_yaml(bootstrap.ads_options_from_args(args))
        else:
            if args.delta:
                raise ValueError("--delta: only with --ads")
            text = bootstrap.render_yaml(bootstrap.options_from_args(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
