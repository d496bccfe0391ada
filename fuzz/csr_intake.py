"""CSR intake (server/domain/csr_policy.py, as Enroll, EnrollBatch, Renew, the zone's
issuing and CreateIdentity use it): PEM or DER bytes of any kind get INVALID_ARGUMENT
(InvalidArgument) or pass, never another exception."""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.server.domain.csr_policy import (
        check_csr,
        check_public_key,
        check_request,
        parse_csr,
    )
    from keyplane.server.errors import InvalidArgument

from fuzz.harness import run


def test_one_input(data: bytes) -> None:
    try:
        check_csr(data)
    except InvalidArgument:
        pass
    # EnrollBatch's order: parse all, refuse known keys, then the signature and subject.
    try:
        csr = parse_csr(data)
        check_public_key(csr)
        check_request(csr)
    except InvalidArgument:
        pass


if __name__ == "__main__":
    run(test_one_input)
