"""Secrets are compared in constant time: an AST walk over server/, zone/, clients/ and
plugins/ finds `==` and `!=` with an operand named like a secret (a token, MAC, proof,
password, nonce, commitment, PIN, one-time link or signature) and fails, naming the
line; hmac.compare_digest is the way. Comparing with a literal (an emptiness check),
through len(), or with an ALL_CAPS name (a constant: a setting's name) is not judged.
An operand named like a secret that is not one is listed in PUBLIC with the reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "zone", "clients", "plugins")
SECRET = re.compile(
    r"(^|_)(tokens?|mac|hmac|proofs?|passwords?|passphrase|secrets?|nonces?|commitment|"
    r"otp|pin|so_pin|link|signatures?)($|_)",
    re.IGNORECASE,
)
# Names that hold what a secret is about, not the secret itself.
ABOUT = re.compile(
    r"_(id|ids|time|file|path|count|uses|name|kind|state|role|label|len|size|at|type|"
    r"prefix|uri|url|algorithm|fingerprint|version)$",
    re.IGNORECASE,
)
# file -> expression -> why it is not a secret
PUBLIC: dict[str, dict[str, str]] = {
    "plugins/pkcs11_backend.py": {
        "parsed.token != self.token_label": "a PKCS#11 token (the device)'s label",
        "planned.token != self.token_label": "a PKCS#11 token (the device)'s label",
    },
}


def _operand_names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.Subscript):
        return _operand_names(node.value)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return [] if name in ("len", "isinstance", "type", "bool", "int") else [name]
    return []


def secret_comparisons(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, expression) of each `==`/`!=` on something named like a secret."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(isinstance(o, ast.Constant) for o in operands):
            continue
        names = [n for o in operands for n in _operand_names(o)]
        if any(SECRET.search(n) and not ABOUT.search(n) and not n.isupper() for n in names):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_secret_is_compared_with_eq() -> None:
    offending = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            allowed = PUBLIC.get(relative, {})
            for line, expression in secret_comparisons(path.read_text(), relative):
                if expression not in allowed:
                    offending.append(f"{relative}:{line}: {expression}")
    assert not offending, "compare these with hmac.compare_digest:\n" + "\n".join(offending)


def test_every_public_exception_is_still_there() -> None:
    for relative, expressions in PUBLIC.items():
        found = {e for _, e in secret_comparisons((ROOT / relative).read_text(), relative)}
        assert set(expressions) <= found, f"{relative}: drop the stale PUBLIC entries"


def test_the_rule_finds_what_it_is_for() -> None:
    planted = """
def check(token, record, request, given_mac, expected):
    if token == record.token_hash: pass
    if request.proof != expected: pass
    if given_mac == expected: pass
    if record.password == request.password: pass
    if self.link_secret == link: pass
    if record.peer_nonce == body.nonce: pass
"""
    assert [line for line, _ in secret_comparisons(planted)] == [3, 4, 5, 6, 7, 8]
    harmless = """
def check(token, record, name):
    if token == "": pass
    if len(token) == 32: pass
    if record.token_id == name: pass
    if name == DATABASE_PASSWORD: pass
    if record.proof_time != 0: pass
"""
    assert secret_comparisons(harmless) == []
