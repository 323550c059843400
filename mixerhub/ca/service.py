"""istio.v1.auth.IstioCertificateService/CreateCertificate over TLS, on its own port (15012).

A caller proves who it is by a client certificate from this CA (its SPIFFE URI SAN) or by a
bootstrap token (``authorization: Bearer <token>``), on the same port as Istio's istiod serves
both. The CSR may name only that identity; the answer is the chain leaf first, root last.

Why there is a TLS front: gRPC Python can require a client certificate or not ask for one, but
not ask for one and accept its absence (Go's VerifyClientCertIfGiven, what istiod uses). So TLS
is ended here by Python's ssl with an optional, verified client certificate, and each connection
is relayed to the gRPC server on a loopback port. The relay's local port is the key to the
connection's verified certificate: the handler reads it from the gRPC peer address. A process
that connects to the loopback port itself has no entry there, so it can only use a token.

Refusals (gRPC status, message): no identity or an unknown token -> UNAUTHENTICATED; a SAN the
caller may not hold or an impersonation request -> PERMISSION_DENIED; a malformed or badly
signed CSR, an unsupported key, a negative validity or one above the maximum ->
INVALID_ARGUMENT. A validity of 0 (the proto3 default, i.e. unset) gets the default TTL, as in
Istio's CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from mixerhub.ca import proto
from mixerhub.ca.authority import Authority, IssuedCertificate, TtlError
from mixerhub.ca.bundle import write_private, write_public
from mixerhub.ca.csr import CsrError, CsrIdentityError
from mixerhub.ca.identity import IdentityError, SpiffeId
from mixerhub.ca.tokens import BootstrapTokens

log = logging.getLogger(__name__)

# The names istio-agent dials (istiod.istio-system.svc) and the usual local ones.
DEFAULT_SERVER_NAMES = ("istiod.istio-system.svc", "istiod", "mixerhub", "localhost")
HANDSHAKE_TIMEOUT = 10.0
# How often the server looks for a changed trust bundle (and retries a failed renewal).
REFRESH_CHECK_SECONDS = 5.0
MAX_REQUEST_BYTES = 256 * 1024
# Istio's metadata key for istiod asking on another workload's behalf; not supported here.
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
# The identity in the CA port's own certificate, beside its DNS names (namespace, account).
HUB_SERVICE_ACCOUNT = ("istio-system", "mixerhub")


class CertificateService:
    """The CreateCertificate handler; ``peer_certificates`` maps a relay port to the DER of
    the client certificate its TLS connection presented (None: no certificate)."""

    def __init__(self, authority: Authority, tokens: BootstrapTokens | None) -> None:
        self.authority = authority
        self.tokens = tokens or BootstrapTokens()
        self.peer_certificates: dict[int, bytes | None] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            proto.SERVICE,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self.create_certificate,
                    request_deserializer=proto.IstioCertificateRequest.FromString,
                    response_serializer=proto.IstioCertificateResponse.SerializeToString,
                )
            },
        )

    async def create_certificate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = await self._caller(context)
        if request.HasField("metadata") and IMPERSONATED_IDENTITY in request.metadata.fields:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "impersonation (metadata ImpersonatedIdentity) is not supported by this CA",
            )
        validity = request.validity_duration
        if validity < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"validity_duration {validity}s is negative",
            )
        limit = self.authority.max_workload_cert_ttl.total_seconds()
        if validity > limit:
            # Checked on the integer: a huge int64 does not fit a timedelta.
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requested TTL {validity}s is greater than the max allowed TTL {limit:g}s",
            )
        ttl = datetime.timedelta(seconds=validity) if validity else None
        try:
            signed = await self.authority.sign_csr_async(request.csr, caller, ttl=ttl)
        except CsrIdentityError as e:
            log.warning("CreateCertificate refused for %s: %s", caller, e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except (CsrError, TtlError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("issued %s serial %x until %s", caller, signed.serial, signed.not_after)
        return proto.IstioCertificateResponse(cert_chain=list(signed.cert_chain))

    async def _caller(self, context: grpc.aio.ServicerContext) -> SpiffeId:
        der = self.peer_certificates.get(_relay_port(context.peer()))
        if der is not None:
            identity = self._certificate_identity(der)
            if identity is not None:
                return identity
        token = _bearer_token(context.invocation_metadata())
        if token is not None:
            identity = self.tokens.identity(token)
            if identity is not None:
                return identity
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bootstrap token not recognised")
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "no caller identity: present a client certificate issued by this CA, or"
            " 'authorization: Bearer <bootstrap token>'",
        )
        raise AssertionError("abort returns only by raising")

    def _certificate_identity(self, der: bytes) -> SpiffeId | None:
        """The SPIFFE ID of a client certificate TLS has verified against the trust bundle."""
        try:
            cert = x509.load_der_x509_certificate(der)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return None
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        spiffe = [u for u in uris if u.startswith("spiffe://")]
        if len(spiffe) != 1:
            return None
        try:
            identity = SpiffeId.parse(spiffe[0])
        except IdentityError:
            return None
        if identity.trust_domain != self.authority.trust_domain:
            return None
        return identity


def _relay_port(peer: str) -> int:
    # "ipv4:127.0.0.1:54321"; anything else cannot be one of ours.
    host, _, port = peer.rpartition(":")
    if host != "ipv4:127.0.0.1" or not port.isdigit():
        return -1
    return int(port)


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class CaServer:
    """The CA's TLS port. Its own certificate comes from the authority and is renewed at half
    its lifetime; the trust bundle it verifies clients with follows the authority's."""

    def __init__(
        self,
        authority: Authority,
        tokens: BootstrapTokens | None = None,
        *,
        server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
        server_identity: SpiffeId | None = None,
    ) -> None:
        self.authority = authority
        if server_identity is None:
            server_identity = SpiffeId(authority.trust_domain, *HUB_SERVICE_ACCOUNT)
        self.service = CertificateService(authority, tokens)
        self.server_names = tuple(server_names)
        self.server_identity = server_identity
        self.port = 0
        self._grpc: grpc.aio.Server | None = None
        self._inner_port = 0
        self._listener: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._context: ssl.SSLContext | None = None
        self._certificate: IssuedCertificate | None = None
        self._bundle = ""
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, address: str, port: int) -> int:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        server.add_generic_rpc_handlers([self.service.handler()])
        self._inner_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc = server
        names = list(self.server_names)
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(address).is_unspecified:
                names.append(address)
        if "127.0.0.1" not in names:
            names.append("127.0.0.1")
        self.server_names = tuple(names)
        try:
            await self._refresh()
            self._refresher = asyncio.create_task(self._keep_fresh())
            self._listener = await asyncio.start_server(self._accept, address, port)
        except BaseException:
            await self.stop(None)  # e.g. the port is taken: leave nothing running
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("CA (IstioCertificateService) listening on %s:%d", address, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def _refresh(self) -> None:
        """A new server certificate and TLS context, for the connections accepted from now."""
        bundle = self.authority.trust_bundle()
        cert = await asyncio.to_thread(
            self.authority.issue_server_certificate, self.server_names, self.server_identity
        )
        self._context = await asyncio.to_thread(_server_context, cert, bundle)
        self._certificate, self._bundle = cert, bundle
        log.debug("CA server certificate serial %x until %s", cert.serial, cert.not_after)

    async def _keep_fresh(self) -> None:
        """Renew the server certificate at half its lifetime, and follow trust bundle changes
        (a root rotation), in the background: a connection takes the current context without
        waiting, since any wait before start_tls would let the ClientHello be read as plain
        data."""
        while True:
            cert = self._certificate
            assert cert is not None
            wait = (cert.renew_at - datetime.datetime.now(datetime.UTC)).total_seconds()
            await asyncio.sleep(min(max(wait, 0.0), REFRESH_CHECK_SECONDS))
            now = datetime.datetime.now(datetime.UTC)
            if now < cert.renew_at and self.authority.trust_bundle() == self._bundle:
                continue
            try:
                await self._refresh()
            except Exception:
                log.exception("CA server certificate not renewed; retrying")
                await asyncio.sleep(REFRESH_CHECK_SECONDS)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        port = -1
        abort = False
        try:
            assert self._context is not None
            # No await before start_tls: see _keep_fresh.
            await writer.start_tls(self._context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            tls = writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True) if tls is not None else None
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self._inner_port)
            port = upstream.get_extra_info("sockname")[1]
            self.service.peer_certificates[port] = der
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log.debug("CA connection ended: %s", e)
        except asyncio.CancelledError:
            # Stopping: a TLS close would wait for the peer's close_notify; do not.
            abort = True
            raise
        finally:
            self.service.peer_certificates.pop(port, None)
            for w in (upstream, writer):
                if w is None:
                    continue
                if abort:
                    w.transport.abort()
                    continue
                w.close()
                # A TLS close waits for the peer's close_notify: bounded here.
                try:
                    await asyncio.wait_for(w.wait_closed(), 1)
                except (OSError, ssl.SSLError, TimeoutError):
                    w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


def _server_context(cert: IssuedCertificate, bundle: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # gRPC clients insist on HTTP/2 by ALPN.
    context.set_alpn_protocols(["h2"])
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=bundle)
    # The ssl module reads a key only from a file: a private directory, removed at once.
    tmp = Path(tempfile.mkdtemp(prefix="mixerhub-ca-"))
    try:
        write_public(tmp / "chain.pem", cert.cert_chain_pem.encode())
        write_private(tmp / "key.pem", cert.private_key_pem.encode())
        context.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return context


async def start_ca_server(
    authority: Authority,
    address: str,
    port: int,
    tokens: BootstrapTokens | None = None,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    server_identity: SpiffeId | None = None,
) -> CaServer:
    """Serve CreateCertificate on ``address:port`` (0: any free port, read ``.port``); stop
    with ``await server.stop(grace)``."""
    server = CaServer(authority, tokens, server_names=server_names, server_identity=server_identity)
    await server.start(address, port)
    return server
