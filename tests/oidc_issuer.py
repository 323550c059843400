"""A test OpenID Connect issuer: discovery document, JWKS, and tokens signed with joserfc.

In-process, from async tests::

    async with OidcIssuer() as issuer:          # a free 127.0.0.1 port
        token = issuer.token(sub="alice", aud="shop")
        issuer.rotate()                         # a new current key (the old one stays published)
        issuer.fail(503); issuer.recover()      # documents answered with 503, then fine again
        await issuer.refuse(); await issuer.listen()   # connection refused, then back
        issuer.fetches["jwks"]                  # how often each document was served

As a process, for end-to-end tests with a real Envoy::

    python tests/oidc_issuer.py --port 8443 [--alg ES256]

prints the issuer URL and serves, besides the two documents, ``GET /token?sub=&aud=&exp_in=``
(a signed token) and ``POST /control/rotate``, ``/control/fail?status=503``,
``/control/recover``, ``GET /control/fetches``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from joserfc import jwk, jwt
from joserfc.jws import JWSRegistry

Algorithm = Literal["RS256", "ES256", "PS256", "ES384"]


@dataclass
class SigningKey:
    kid: str
    alg: str
    key: jwk.Key


def generate_key(alg: str, kid: str) -> jwk.Key:
    if alg.startswith(("RS", "PS")):
        return jwk.RSAKey.generate_key(2048, parameters={"kid": kid, "alg": alg, "use": "sig"})
    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
    return jwk.ECKey.generate_key(curve, parameters={"kid": kid, "alg": alg, "use": "sig"})


def b64url(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcIssuer:
    def __init__(self, alg: str = "RS256", *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self._port = host, port
        self.keys: list[SigningKey] = []
        self.current: SigningKey = self.add_key(alg)
        self.fetches: Counter[str] = Counter()
        self.extra_jwks: list[dict[str, Any]] = []  # published as they are, after the keys
        self.status: int | None = None  # answer every document with this status when set
        self.mint_endpoint = False
        self._runner: web.AppRunner | None = None

    # --- keys and tokens ------------------------------------------------------------------------

    def add_key(self, alg: str = "RS256") -> SigningKey:
        kid = f"key-{len(self.keys) + 1}"
        key = SigningKey(kid, alg, generate_key(alg, kid))
        self.keys.append(key)
        return key

    def rotate(self, alg: str | None = None, *, drop_old: bool = False) -> SigningKey:
        """A new signing key becomes current; the old ones stay published unless dropped."""
        new = self.add_key(alg or self.current.alg)
        if drop_old:
            self.keys = [new]
        self.current = new
        return new

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.key.as_dict(private=False) for k in self.keys] + self.extra_jwks}

    def token(
        self,
        sub: str | None = "alice",
        aud: str | list[str] | None = None,
        *,
        exp_in: float | None = 600,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
        iss: str | None = None,
        **claims: Any,
    ) -> str:
        signer = key or self.current
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer if iss is None else iss, "iat": now}
        if sub is not None:
            body["sub"] = sub
        if aud is not None:
            body["aud"] = aud
        if exp_in is not None:
            body["exp"] = now + int(exp_in)
        body.update(claims)
        head = {"alg": signer.alg, "kid": signer.kid, **(header or {})}
        head = {k: v for k, v in head.items() if v is not None}
        # Any header field goes (tests forge odd ones); the verifier is what is under test.
        registry = JWSRegistry(algorithms=[signer.alg], strict_check_header=False)
        return jwt.encode(head, body, signer.key, registry=registry)

    # --- the server -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    def fail(self, status: int = 503) -> None:
        """Answer every document with ``status`` until ``recover()``."""
        self.status = status

    def recover(self) -> None:
        self.status = None

    async def start(self) -> OidcIssuer:
        await self.listen()
        return self

    async def listen(self) -> None:
        """Open the port (again, after ``refuse()``: the issuer is reachable on the same port)."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks.json", self._jwks)
        if self.mint_endpoint:
            app.router.add_get("/token", self._mint)
            app.router.add_post("/control/rotate", self._control_rotate)
            app.router.add_post("/control/fail", self._control_fail)
            app.router.add_post("/control/recover", self._control_recover)
            app.router.add_get("/control/fetches", self._control_fetches)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def refuse(self) -> None:
        """Stop listening and drop open connections: clients get "connection refused"."""
        await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> OidcIssuer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.fetches["discovery"] += 1
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_uri,
                "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys}),
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches["jwks"] += 1
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(self.jwks())

    async def _mint(self, request: web.Request) -> web.Response:
        q = request.query
        aud = q.getall("aud", None)
        token = self.token(
            q.get("sub", "alice"),
            aud[0] if aud and len(aud) == 1 else aud,
            exp_in=float(q.get("exp_in", "600")),
        )
        return web.Response(text=token)

    async def _control_rotate(self, request: web.Request) -> web.Response:
        key = self.rotate(drop_old=request.query.get("drop_old") == "true")
        return web.json_response({"kid": key.kid})

    async def _control_fail(self, request: web.Request) -> web.Response:
        self.status = int(request.query.get("status", "503"))
        return web.json_response({"status": self.status})

    async def _control_recover(self, request: web.Request) -> web.Response:
        self.recover()
        return web.json_response({})

    async def _control_fetches(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.fetches))


async def _serve(port: int, alg: str, host: str) -> None:
    issuer = OidcIssuer(alg, host=host, port=port)
    issuer.mint_endpoint = True
    async with issuer:
        print(issuer.issuer, flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--alg", default="RS256", choices=["RS256", "PS256", "ES256", "ES384"])
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.alg, args.host))


if __name__ == "__main__":
    main()
