"""Bootstrap tokens: how a workload without a certificate yet proves who it is to the CA.

The file (YAML or JSON) maps each token to the identity it stands for::

    s3cr3t-token-for-sleep: {namespace: default, serviceAccount: sleep}

A caller sends ``authorization: Bearer <token>``. Tokens are kept only as SHA-256 digests, so a
lookup compares digests and takes no longer for a token sharing a prefix with a real one. The
file is read again when it changes; a new version with errors leaves the previous one in force.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import yaml

from mixerhub.ca.identity import IdentityError, SpiffeId

log = logging.getLogger(__name__)

# A short token is guessable; 16 characters is already a low bar.
MIN_TOKEN_LENGTH = 16


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the entry."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(raw: object, trust_domain: str, where: str = "tokens") -> dict[bytes, SpiffeId]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise TokenFileError(f"{where}: a mapping of token -> {{namespace, serviceAccount}}")
    tokens: dict[bytes, SpiffeId] = {}
    for i, (token, entry) in enumerate(raw.items()):
        at = f"{where}: entry {i}"
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(f"{at}: a token is a string of {MIN_TOKEN_LENGTH}+ characters")
        if not isinstance(entry, Mapping):
            raise TokenFileError(f"{at}: expected {{namespace, serviceAccount}}")
        namespace = entry.get("namespace")
        account = entry.get("serviceAccount", entry.get("service_account"))
        if not isinstance(namespace, str) or not isinstance(account, str):
            raise TokenFileError(f"{at}: namespace and serviceAccount are required strings")
        try:
            tokens[_digest(token)] = SpiffeId(trust_domain, namespace, account)
        except IdentityError as e:
            raise TokenFileError(f"{at}: {e}") from None
    return tokens


class BootstrapTokens:
    def __init__(self, tokens: Mapping[str, SpiffeId] | None = None) -> None:
        self._tokens = {_digest(t): identity for t, identity in (tokens or {}).items()}
        self._path: Path | None = None
        self._trust_domain = ""
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, trust_domain: str) -> BootstrapTokens:
        """Raises TokenFileError when the file is missing or wrong."""
        store = cls()
        store._path, store._trust_domain = path, trust_domain
        stamp = store._stat()
        if stamp is None:
            raise TokenFileError(f"{path}: cannot be read")
        store._tokens = store._read()
        store._stamp = stamp
        return store

    def identity(self, token: str) -> SpiffeId | None:
        self._reload_if_changed()
        return self._tokens.get(_digest(token))

    def __len__(self) -> int:
        return len(self._tokens)

    def _stat(self) -> tuple[int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _read(self) -> dict[bytes, SpiffeId]:
        assert self._path is not None
        try:
            raw = yaml.safe_load(self._path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise TokenFileError(f"{self._path}: {e}") from None
        return parse_tokens(raw, self._trust_domain, str(self._path))

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._tokens = self._read()
            except TokenFileError as e:
                log.error("bootstrap tokens not reloaded, the previous ones stay: %s", e)
                return
            log.info("bootstrap tokens reloaded from %s: %d tokens", self._path, len(self._tokens))
