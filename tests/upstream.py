"""An echo upstream for the end-to-end tests: the service Envoy fronts.

Every request, whatever its method and path, gets 200 and a JSON body describing what arrived:
``{"method", "path", "headers": {...}, "body"}``; header names are lower-cased, so a test can see
what Envoy added or removed on the way. Run as ``python tests/upstream.py --port-file FILE``: it
binds a port of its choosing and writes the number to FILE once it is listening, so no other
process can take the port between the choice and the bind. ``--name`` adds ``"server": NAME`` to
every body, so a test can tell which of several upstreams answered; ``--fail-every N`` answers
every Nth request with 503 instead (an upstream that retries get past).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so Envoy can keep its upstream connections open between requests.
    protocol_version = "HTTP/1.1"
    name = ""
    fail_every = 0
    served = 0
    lock = threading.Lock()

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.lock:
            EchoHandler.served += 1
            fail = self.fail_every > 0 and EchoHandler.served % self.fail_every == 0
        if fail:
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        payload = json.dumps(
            {
                **({"server": self.name} if self.name else {}),
                "method": self.command,
                "path": self.path,
                "headers": {name.lower(): value for name, value in self.headers.items()},
                "body": body.decode("utf-8", errors="replace"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    parser.add_argument("--port-file", help="where to write the port once listening")
    parser.add_argument("--name", default="", help='put in every body as "server"')
    parser.add_argument("--fail-every", type=int, default=0, help="answer every Nth with 503")
    args = parser.parse_args(argv)
    EchoHandler.name, EchoHandler.fail_every = args.name, args.fail_every
    with ThreadingHTTPServer((args.host, args.port), EchoHandler) as server:
        port = server.server_address[1]
        print(f"echo upstream listening on {args.host}:{port}", file=sys.stderr, flush=True)
        if args.port_file:
            # Written whole then renamed, so a reader never sees a partial number.
            partial = f"{args.port_file}.partial"
            with open(partial, "w") as file:
                file.write(str(port))
            os.replace(partial, args.port_file)
        server.serve_forever()


if __name__ == "__main__":
    main()
