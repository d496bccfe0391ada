"""The pkcs11 backend on a real SoftHSM token: what lands on the token, and how it fails."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass

from keyplane.plugins.errors import (
    BackendAuthError,
    BackendConfigError,
    BackendUnavailableError,
    InvalidKeyUriError,
    KeyNotFoundError,
)
from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm
from keyplane.plugins.manager import KeyBackends
from keyplane.plugins.pkcs11_backend import Pkcs11Backend
from keyplane.plugins.uri import Pkcs11KeyUri
from tests.softhsm import SoftHsmToken

pytestmark = pytest.mark.softhsm


def open_pkcs11(options: dict[str, object], data_dir: Path) -> KeyBackends:
    return KeyBackends({"pkcs11": options}, data_dir)


@pytest.fixture
def keys(softhsm_token: SoftHsmToken, tmp_path: Path) -> Iterator[KeyBackends]:
    backends = open_pkcs11(softhsm_token.backend_options(tmp_path), tmp_path / "data")
    try:
        yield backends
    finally:
        backends.close()


def _verify_ecdsa(key: BackendPrivateKey, message: bytes) -> None:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048], ids=str)
def test_generated_key_is_sensitive_and_never_extractable_on_the_token(
    keys: KeyBackends, softhsm_token: SoftHsmToken, algorithm: KeyAlgorithm
) -> None:
    generated = keys.generate_key("pkcs11", "attribute-check", algorithm)
    key_id = Pkcs11KeyUri.parse(generated.uri).id
    keys.close()

    with softhsm_token.session() as session:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id)
        assert private[Attribute.LABEL] == "attribute-check"
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.PRIVATE] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.ALWAYS_SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.SIGN] is True
        assert private[Attribute.DECRYPT] is False
        assert public[Attribute.TOKEN] is True
        assert public[Attribute.VERIFY] is True
        secret = Attribute.VALUE if algorithm.is_ec else Attribute.PRIVATE_EXPONENT
        with pytest.raises(pkcs11.AttributeSensitive):
            private[secret]


def test_uri_names_the_token_label_and_a_16_byte_id(
    keys: KeyBackends, softhsm_token: SoftHsmToken
) -> None:
    generated = keys.generate_key("pkcs11", "root 1", KeyAlgorithm.EC_P256)

    uri = Pkcs11KeyUri.parse(generated.uri)
    assert uri.token == softhsm_token.label
    assert uri.object == "root 1"
    assert uri.id is not None and len(uri.id) == 16
    assert softhsm_token.pin not in generated.uri


def test_key_found_by_id_alone_or_by_label_alone(keys: KeyBackends) -> None:
    generated = keys.generate_key("pkcs11", "findable-by-label", KeyAlgorithm.EC_P256)
    uri = Pkcs11KeyUri.parse(generated.uri)

    by_id = str(Pkcs11KeyUri(id=uri.id))
    by_label = str(Pkcs11KeyUri(object=uri.object))

    _verify_ecdsa(keys.private_key(by_id), b"by id")
    _verify_ecdsa(keys.private_key(by_label), b"by label")


def test_label_shared_by_two_keys_is_ambiguous_without_an_id(keys: KeyBackends) -> None:
    first = keys.generate_key("pkcs11", "same-label", KeyAlgorithm.EC_P256)
    keys.generate_key("pkcs11", "same-label", KeyAlgorithm.EC_P256)

    with pytest.raises(InvalidKeyUriError, match="more than one key"):
        keys.private_key("pkcs11:object=same-label")
    _verify_ecdsa(keys.private_key(first.uri), b"the id tells them apart")


def test_uri_of_another_token_is_not_found(keys: KeyBackends) -> None:
    generated = keys.generate_key("pkcs11", "other-token", KeyAlgorithm.EC_P256)
    uri = Pkcs11KeyUri.parse(generated.uri)

    with pytest.raises(KeyNotFoundError, match="other-hsm"):
        keys.private_key(str(Pkcs11KeyUri(token="other-hsm", object=uri.object, id=uri.id)))


def test_uri_carrying_a_pin_is_refused(keys: KeyBackends, softhsm_token: SoftHsmToken) -> None:
    uri = f"pkcs11:token={softhsm_token.label};object=x?pin-value={softhsm_token.pin}"

    with pytest.raises(InvalidKeyUriError) as excinfo:
        keys.private_key(uri)

    assert softhsm_token.pin not in str(excinfo.value)


def test_wrong_pin_is_refused_without_showing_it(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    wrong = "wrong-pin-918273"

    with pytest.raises(BackendAuthError) as excinfo:
        open_pkcs11(softhsm_token.backend_options(tmp_path, pin=wrong), tmp_path)

    assert softhsm_token.label in str(excinfo.value)
    assert wrong not in str(excinfo.value)
    assert softhsm_token.pin not in str(excinfo.value)


def test_wrong_pin_is_refused_while_another_backend_is_logged_in(
    keys: KeyBackends, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    # PKCS#11 login is per process: the token answers UserAlreadyLoggedIn to any PIN.
    wrong = "wrong-pin-918273"
    (tmp_path / "second").mkdir()

    with pytest.raises(BackendAuthError) as excinfo:
        open_pkcs11(softhsm_token.backend_options(tmp_path / "second", pin=wrong), tmp_path)

    assert wrong not in str(excinfo.value)


def test_second_backend_with_the_right_pin_shares_the_login(
    keys: KeyBackends, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    generated = keys.generate_key("pkcs11", "shared", KeyAlgorithm.EC_P256)
    not_yet_used = keys.generate_key("pkcs11", "shared-later", KeyAlgorithm.EC_P256)
    (tmp_path / "second").mkdir()
    second = open_pkcs11(softhsm_token.backend_options(tmp_path / "second"), tmp_path)
    try:
        key = second.private_key(generated.uri)
        _verify_ecdsa(key, b"second")
        # Closing the backend that logged in logs the whole process out of the token;
        # the other backend logs in again, both to look a key up and to sign.
        keys.close()
        _verify_ecdsa(second.private_key(not_yet_used.uri), b"looked up after close")
        _verify_ecdsa(key, b"signed after close")
    finally:
        second.close()


def test_missing_module_is_unavailable_and_names_the_path(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    options = softhsm_token.backend_options(tmp_path)
    options["module"] = str(tmp_path / "no-such-pkcs11-module.so")

    with pytest.raises(BackendUnavailableError, match=r"no-such-pkcs11-module\.so"):
        open_pkcs11(options, tmp_path)


def test_unknown_token_label_is_unavailable_and_names_the_label(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    options = softhsm_token.backend_options(tmp_path)
    options["token"] = "no-such-token"

    with pytest.raises(BackendUnavailableError, match="no-such-token"):
        open_pkcs11(options, tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pin_file": None}, "pin_env"),
        ({"pin_env": "KEYPLANE_TEST_HSM_PIN"}, "exactly one"),
        ({"token": None}, "token"),
        ({"slot": "0"}, "unknown option"),
        ({"pin_file": "/nonexistent/hsm-pin"}, "pin_file"),
    ],
    ids=["no-pin", "pin-env-and-file", "no-token", "unknown-option", "unreadable-pin-file"],
)
def test_bad_options_are_config_errors(
    softhsm_token: SoftHsmToken, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    options = softhsm_token.backend_options(tmp_path)
    for name, value in change.items():
        if value is None:
            del options[name]
        else:
            options[name] = value

    with pytest.raises(BackendConfigError, match=message):
        open_pkcs11(options, tmp_path)


def test_pin_from_environment_variable(
    softhsm_token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYPLANE_TEST_HSM_PIN", softhsm_token.pin)
    options = {"token": softhsm_token.label, "pin_env": "KEYPLANE_TEST_HSM_PIN"}

    backends = open_pkcs11(options, tmp_path)
    try:
        generated = backends.generate_key("pkcs11", "pin-env", KeyAlgorithm.EC_P256)
        _verify_ecdsa(backends.private_key(generated.uri), b"env")
    finally:
        backends.close()


def test_signing_recovers_when_the_session_is_closed_underneath(
    keys: KeyBackends, softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    generated = keys.generate_key("pkcs11", "recovery", KeyAlgorithm.RSA_2048)
    key = keys.private_key(generated.uri)
    message = b"before and after"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    assert isinstance(key, rsa.RSAPrivateKey)
    key.sign(message, pss, hashes.SHA256())
    backend = keys.backend("pkcs11")
    assert isinstance(backend, Pkcs11Backend)

    assert backend._session is not None
    backend._session.close()  # as if the token dropped the session
    with caplog.at_level(logging.DEBUG, logger="keyplane.plugins.pkcs11_backend"):
        signature = key.sign(message, pss, hashes.SHA256())

    assert isinstance(generated.public_key, rsa.RSAPublicKey)
    generated.public_key.verify(signature, message, pss, hashes.SHA256())
    assert "session on token" in caplog.text
    assert softhsm_token.pin not in caplog.text


def test_closed_backend_refuses_to_sign(keys: KeyBackends) -> None:
    generated = keys.generate_key("pkcs11", "closed", KeyAlgorithm.EC_P256)
    key = keys.private_key(generated.uri)

    keys.close()

    with pytest.raises(BackendUnavailableError, match="closed"):
        key.sign(b"too late", ec.ECDSA(hashes.SHA256()))


def test_key_is_visible_to_the_token_tools(keys: KeyBackends, softhsm_token: SoftHsmToken) -> None:
    keys.generate_key("pkcs11", "visible-to-tools", KeyAlgorithm.EC_P256)
    keys.close()

    slots = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, timeout=30, check=True
    )
    assert softhsm_token.label in slots.stdout
    if shutil.which("pkcs11-tool") is None:
        return
    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            softhsm_token.module,
            "--token-label",
            softhsm_token.label,
            "--login",
            "--pin",
            softhsm_token.pin,
            "--list-objects",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "visible-to-tools" in listing.stdout
    assert "Private Key Object; EC" in listing.stdout
