"""A TCP echo upstream for the end-to-end tests: the service a ``--tcp`` Envoy fronts.

Each connection first gets the greeting (``--greeting``, "mixerhub tcp echo\\n" by default), then
every byte it sends back; when the client half-closes, the server closes too. The greeting makes
the two directions differ in size, so a test can tell bytes received from the client from bytes
sent to it. Run as ``python tests/tcp_upstream.py --port-file FILE``: it binds a port of its
choosing and writes the number to FILE once it is listening, so no other process can take the port
between the choice and the bind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

DEFAULT_GREETING = "mixerhub tcp echo\n"
CHUNK = 65536


async def echo(greeting: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(greeting)
        await writer.drain()
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int, port_file: str | None, greeting: bytes) -> None:
    server = await asyncio.start_server(
        lambda reader, writer: echo(greeting, reader, writer), host, port
    )
    bound: int = server.sockets[0].getsockname()[1]
    print(f"tcp echo upstream listening on {host}:{bound}", file=sys.stderr, flush=True)
    if port_file:
        # Written whole then renamed, so a reader never sees a partial number.
        partial = f"{port_file}.partial"
        with open(partial, "w") as file:
            file.write(str(bound))
        os.replace(partial, port_file)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    parser.add_argument("--port-file", help="where to write the port once listening")
    parser.add_argument(
        "--greeting", default=DEFAULT_GREETING, help="sent first on each connection"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.port_file, args.greeting.encode()))


if __name__ == "__main__":
    main()
