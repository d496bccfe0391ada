"""Key URIs: `software:<id>` and RFC 7512 `pkcs11:` URIs, parsed strictly.

Conflicting or forbidden selectors (a PIN inside the URI, a repeated attribute) fail
here, when the URI is parsed, not later when the key is used.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from keyplane.plugins.errors import InvalidKeyUriError

_SOFTWARE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Path attributes of RFC 7512 that keyplane understands; the rest are refused.
_PKCS11_PATH_ATTRS = frozenset({"token", "object", "id", "type", "manufacturer", "serial", "model"})
_FORBIDDEN_QUERY = frozenset({"pin-value"})
_PKCS11_QUERY_ATTRS = frozenset({"pin-source", "module-path", "module-name"})


def scheme_of(uri: str) -> str:
    """The scheme of a key URI (`software`, `pkcs11`, ...); InvalidKeyUriError if none."""
    scheme, sep, _ = uri.partition(":")
    if not sep or not scheme or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise InvalidKeyUriError(f"not a key URI (expected '<scheme>:...'): {uri[:80]!r}")
    return scheme


@dataclass(frozen=True)
class SoftwareKeyUri:
    """`software:<id>`: a key sealed in the software backend's pki.db."""

    key_id: str

    @classmethod
    def parse(cls, uri: str) -> SoftwareKeyUri:
        if not uri.startswith("software:"):
            raise InvalidKeyUriError("a software key URI starts with 'software:'")
        key_id = uri[len("software:") :]
        if not _SOFTWARE_ID.fullmatch(key_id):
            raise InvalidKeyUriError(
                "a software key id is 1 to 128 characters of letters, digits, '.', '_' or '-'"
            )
        return cls(key_id)

    def __str__(self) -> str:
        return f"software:{self.key_id}"


@dataclass(frozen=True)
class Pkcs11KeyUri:
    """An RFC 7512 URI naming one key on a token: token label, object label, CKA_ID."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_source: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11KeyUri:
        if not uri.startswith("pkcs11:"):
            raise InvalidKeyUriError("a PKCS#11 key URI starts with 'pkcs11:'")
        rest = uri[len("pkcs11:") :]
        path, _, query = rest.partition("?")
        attrs: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq:
                raise InvalidKeyUriError(f"PKCS#11 URI attribute without a value: {name!r}")
            if name not in _PKCS11_PATH_ATTRS:
                raise InvalidKeyUriError(f"PKCS#11 URI attribute not supported: {name!r}")
            if name in attrs:
                raise InvalidKeyUriError(f"PKCS#11 URI attribute given twice: {name!r}")
            attrs[name] = urllib.parse.unquote(value)
        queries: dict[str, str] = {}
        for part in filter(None, query.split("&")):
            name, _, value = part.partition("=")
            if name in _FORBIDDEN_QUERY:
                raise InvalidKeyUriError(
                    "a PKCS#11 key URI must not carry a PIN (pin-value); "
                    "give the PIN through the backend's pin-source setting"
                )
            if name not in _PKCS11_QUERY_ATTRS:
                raise InvalidKeyUriError(f"PKCS#11 URI query attribute not supported: {name!r}")
            if name in queries:
                raise InvalidKeyUriError(f"PKCS#11 URI query attribute given twice: {name!r}")
            queries[name] = urllib.parse.unquote(value)
        key_type = attrs.get("type")
        if key_type not in (None, "private", "public"):
            raise InvalidKeyUriError("a PKCS#11 key URI's type is 'private' or 'public'")
        raw_id = path_id = None
        if "id" in attrs:
            # The id is binary: percent-decode to bytes, not to text.
            path_id = next(p for p in path.split(";") if p.startswith("id="))[3:]
            raw_id = urllib.parse.unquote_to_bytes(path_id)
        if raw_id is None and "object" not in attrs:
            raise InvalidKeyUriError("a PKCS#11 key URI needs an 'object' or an 'id' attribute")
        return cls(
            token=attrs.get("token"),
            object=attrs.get("object"),
            id=raw_id,
            type=key_type,
            pin_source=queries.get("pin-source"),
        )

    def __str__(self) -> str:
        parts = []
        if self.token is not None:
            parts.append("token=" + urllib.parse.quote(self.token, safe=""))
        if self.object is not None:
            parts.append("object=" + urllib.parse.quote(self.object, safe=""))
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.type is not None:
            parts.append("type=" + self.type)
        text = "pkcs11:" + ";".join(parts)
        if self.pin_source is not None:
            text += "?pin-source=" + urllib.parse.quote(self.pin_source, safe="")
        return text
