"""HSM sign overhead, in a process of its own (SoftHSM reads SOFTHSM2_CONF once per
process): ECDSA P-256 signatures per second through keyplane's pkcs11 backend object
against raw python-pkcs11 signing with the same key on the same token.

    SOFTHSM2_CONF=... python -m bench.hsm_sign TOKEN PIN_FILE DURATION REPEATS

prints {"backend": [rate, ...], "raw": [rate, ...]} as JSON on stdout."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.plugins.manager import KeyBackends
from keyplane.plugins.uri import Pkcs11KeyUri

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DATA = bytes(range(256)) * 4  # 1 KiB


def rate(sign: Callable[[], object], duration: float) -> float:
    count = 0
    began = time.perf_counter()
    deadline = began + duration
    while True:
        sign()
        count += 1
        if not count % 8 and time.perf_counter() >= deadline:
            return count / (time.perf_counter() - began)


def main(token: str, pin_file: str, duration: float, repeats: int) -> dict[str, list[float]]:
    import pkcs11

    options = {"module": MODULE, "token": token, "pin_file": pin_file}
    with tempfile.TemporaryDirectory() as data_dir:
        backends = KeyBackends({"pkcs11": options}, Path(data_dir))
        try:
            generated = backends.generate_key("pkcs11", "bench-sign", "ec-p256")
            key = backends.private_key(generated.uri)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            key_id = Pkcs11KeyUri.parse(generated.uri).id
            session = pkcs11.lib(MODULE).get_token(token_label=token).open()  # logged in already
            try:
                raw_key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=key_id)

                # Made once, as the raw side's mechanism is: the figure is the backend's
                # cost, not that of building cryptography's parameter objects.
                algorithm = ec.ECDSA(hashes.SHA256())

                def through_backend() -> object:
                    return key.sign(DATA, algorithm)

                def raw() -> object:
                    digest = hashlib.sha256(DATA).digest()
                    return raw_key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)

                results: dict[str, list[float]] = {"backend": [], "raw": []}
                through_backend()
                raw()
                for _ in range(repeats):
                    results["backend"].append(rate(through_backend, duration))
                    results["raw"].append(rate(raw, duration))
                return results
            finally:
                session.close()
        finally:
            backends.close()


if __name__ == "__main__":
    token_label, pin_path, seconds, count = sys.argv[1:5]
    print(json.dumps(main(token_label, pin_path, float(seconds), int(count))))
