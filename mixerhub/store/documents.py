"""Reading Kubernetes-style YAML documents (apiVersion, kind, metadata, spec) from disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixerhub.store.errors import ConfigError

# Mixer kept its mesh-wide configuration in istio-system, and Istio's own configs refer to it by
# that name (``requestcount.instance.istio-system``), so a document without a namespace lands there.
DEFAULT_NAMESPACE = "istio-system"

_YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document, located by file and 1-based position in that file."""

    file: str
    index: int
    api_version: str
    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)

    def error(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.index, self.kind, self.name, path, reason)


@dataclass(frozen=True, slots=True)
class Source:
    """What was read: the documents, every error met while reading, and a digest of the bytes."""

    documents: tuple[Document, ...]
    errors: tuple[ConfigError, ...]
    files: tuple[str, ...]
    digest: str


def config_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[ConfigError]]:
    """Every YAML file under the given files and folders (recursively), sorted per folder."""
    files: list[str] = []
    errors: list[ConfigError] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [
                    os.path.join(root, n)
                    for n in sorted(names)
                    if n.endswith(_YAML_SUFFIXES) and not n.startswith(".")
                ]
        elif path.is_file():
            files.append(str(path))
        else:
            errors.append(ConfigError(str(path), 0, "", "", "", "no such file or directory"))
    return files, errors


def read(paths: Iterable[str | os.PathLike[str]]) -> Source:
    """Read every document, collecting all errors rather than stopping at the first."""
    files, errors = config_files(paths)
    documents: list[Document] = []
    digest = hashlib.sha256()
    for file in files:
        try:
            data = Path(file).read_bytes()
        except OSError as e:
            errors.append(ConfigError(file, 0, "", "", "", f"cannot read: {e.strerror}"))
            continue
        digest.update(file.encode() + b"\0" + data + b"\0")
        docs, errs = parse(file, data)
        documents += docs
        errors += errs
    return Source(tuple(documents), tuple(errors), tuple(files), digest.hexdigest()[:16])


def parse(file: str, data: bytes | str) -> tuple[list[Document], list[ConfigError]]:
    """Split one file into documents. A YAML syntax error ends the file (YAML cannot resync)."""
    documents: list[Document] = []
    errors: list[ConfigError] = []
    index = 0
    try:
        for body in yaml.safe_load_all(data):
            index += 1
            if body is None:  # an empty document between two `---`
                continue
            document, errs = _document(file, index, body)
            errors += errs
            if document is not None:
                documents.append(document)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        errors.append(ConfigError(file, index + 1, "", "", "", f"invalid YAML: {where}{problem}"))
    except UnicodeDecodeError as e:
        errors.append(ConfigError(file, 0, "", "", "", f"not UTF-8 text: {e.reason}"))
    return documents, errors


def _document(file: str, index: int, body: object) -> tuple[Document | None, list[ConfigError]]:
    def err(path: str, reason: str, kind: str = "", name: str = "") -> ConfigError:
        return ConfigError(file, index, kind, name, path, reason)

    if not isinstance(body, dict):
        return None, [err("", f"a document must be a mapping, not {_yaml_type(body)}")]
    if "apiVersion" not in body and "kind" not in body and "domain" in body:
        body = _ratelimit_document(body)
    kind = body.get("kind")
    metadata = body.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    kind_s = kind if isinstance(kind, str) else ""
    name_s = name if isinstance(name, str) else ""
    errors: list[ConfigError] = []
    if not isinstance(body.get("apiVersion"), str):
        errors.append(err("apiVersion", "required, a string", kind_s, name_s))
    if not kind_s:
        errors.append(err("kind", "required, a string", kind_s, name_s))
    if not isinstance(metadata, dict):
        errors.append(err("metadata", "must be a mapping", kind_s, name_s))
        metadata = {}
    if not name_s:
        errors.append(err("metadata.name", "required, a string", kind_s, name_s))
    namespace = metadata.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not namespace:
        errors.append(err("metadata.namespace", "must be a non-empty string", kind_s, name_s))
    annotations = _string_map(metadata.get("annotations"))
    labels = _string_map(metadata.get("labels"))
    spec = body.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        errors.append(err("spec", f"must be a mapping, not {_yaml_type(spec)}", kind_s, name_s))
    if errors:
        return None, errors
    return (
        Document(
            file,
            index,
            body["apiVersion"],
            kind_s,
            name_s,
            namespace,
            spec,
            annotations,
            labels,
            body,
        ),
        [],
    )


# envoyproxy/ratelimit's files are bare `{domain, descriptors}` documents; they load unchanged as
# this kind, named after their domain.
RATELIMIT_API_VERSION = "ratelimit.envoyproxy.io/v3"
RATELIMIT_KIND = "RateLimitConfig"


def _ratelimit_document(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": RATELIMIT_API_VERSION,
        "kind": RATELIMIT_KIND,
        "metadata": {"name": str(body.get("domain"))},
        "spec": body,
    }


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _yaml_type(value: object) -> str:
    return {
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)


def iter_kinds(documents: Iterable[Document], kinds: Iterable[str]) -> Iterator[Document]:
    wanted = set(kinds)
    return (d for d in documents if d.kind in wanted)
