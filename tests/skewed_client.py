"""A client run by tests/test_fault_clock.py under faketime (its clock ahead or behind):
enrolls at a server, renews with a proof (its time from this clock) and over mutual TLS,
and prints what happened as one JSON line.

    faketime -f -5m python -m tests.skewed_client DATA_DIR TOKEN AUDIENCE
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cryptography import x509

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.clients.renewal import renewal_proof
from tests.test_enrollment import make_csr, p256
from tests.zonekit import key_pem, mtls_channel


def main(data: Path, token: str, audience: str) -> dict[str, object]:
    endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
    roots = (data / "admin" / "ca.pem").read_bytes()
    done: dict[str, object] = {"client_time": time.time()}
    try:
        key, next_key = p256(), p256()
        with KeyplaneClient(bootstrap_channel_for(endpoint["bootstrap_listen"], roots)) as c:
            issued = c.enroll(make_csr(key, cn="skewed"), token)
            done["enrolled"] = issued.serial
            csr = make_csr(next_key, cn="skewed")
            leaf = x509.load_pem_x509_certificate(issued.certificate_chain_pem.encode())
            proof, made = renewal_proof(key, leaf, csr, audience)
            renewed = c.renew_with_proof(csr, issued.certificate_chain_pem, proof, made)
            done["renewed_with_proof"] = renewed.serial
        # Over mutual TLS with the certificate the server made just now.
        chain = renewed.certificate_chain_pem.encode()
        with KeyplaneClient(mtls_channel(endpoint["listen"], chain, key_pem(next_key), roots)) as h:
            done["renewed"] = h.renew(make_csr(p256(), cn="skewed")).serial
    except Exception as exc:  # reported to the test, which says what failed
        done["error"] = f"{type(exc).__name__}: {exc}"
    return done


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])))
