"""The fuzz targets (fuzz/, README "Fuzzing"), short: each replays the inputs that once
crashed it (fuzz/regressions/) and then mutates its seed corpus for a bounded number of
runs from a fixed seed, in its own process, with no crash, hang or unexpected
exception. `make fuzz` runs them for minutes each. The seeds are real documents that
reach the accepting paths, and each crash the fuzzers found is also a test here, at the
status the server or the CLI gives."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest

from fuzz import __main__ as fuzzing
from fuzz.harness import CORPUS, FIXTURES
from keyplane.clients.bundle import BundleError, load_bundle
from keyplane.clients.trust import TrustStateError, decode_file, load
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.server.domain.csr_policy import check_csr
from keyplane.server.domain.peer_messages import parse_message, roots_of, verify_signed
from keyplane.server.domain.peer_states import follow_peer, load_state
from keyplane.server.domain.renewal import check_renewal_proof, presented_certificate
from keyplane.server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from keyplane.v1 import message_signing_service_pb2, trust_service_pb2

# Runs per target in `make test`: a few seconds each at the rates in the README.
SHORT_RUNS = {
    "csr_intake": 20_000,
    "init_bundle": 20_000,
    "trust_state": 10_000,
    "peer_trust": 10_000,
    "signed_message": 10_000,
    "renewal_proof": 10_000,
    "backup_archive": 1_000,
    "backup_manifest": 20_000,
}


def test_every_target_has_a_seed_corpus_and_a_short_run() -> None:
    modules = {
        p.stem
        for p in (CORPUS.parent).glob("*.py")
        if p.stem not in ("__init__", "__main__", "harness", "make_corpus")
    }
    assert modules == set(fuzzing.TARGETS) == set(SHORT_RUNS)
    for target in fuzzing.TARGETS:
        assert any((CORPUS / target).iterdir()), target


@pytest.mark.parametrize("target", [t for t in fuzzing.TARGETS if fuzzing.regressions(t)])
def test_the_inputs_that_once_crashed_a_target_pass(target: str) -> None:
    done = fuzzing.replay(target, sys.executable)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", fuzzing.TARGETS)
def test_a_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    outcome = fuzzing.fuzz(target, tmp_path, runs=SHORT_RUNS[target], seconds=120, seed=1)
    log = outcome.log.read_text(errors="replace")
    assert outcome.ok, log[-4000:]
    assert outcome.runs >= SHORT_RUNS[target] or "max_total_time" in log, log[-2000:]
    assert not any((tmp_path / "crashes").iterdir())


# -- the seeds reach the accepting paths ------------------------------------------------


def test_the_seeds_are_accepted_documents() -> None:
    for name in ("p256.pem", "p384.der", "rsa2048.pem", "ed25519.der", "san.pem"):
        check_csr((CORPUS / "csr_intake" / name).read_bytes())
    load_bundle((CORPUS / "init_bundle" / "two-roots.dat").read_bytes())
    held = load((FIXTURES / "trust-first.bin").read_bytes())
    assert load((FIXTURES / "trust.bin").read_bytes()).version > held.version
    push = trust_service_pb2.PushTrustStateRequest.FromString(
        (CORPUS / "peer_trust" / "push.bin").read_bytes()
    )
    first = load_state((FIXTURES / "trust-first.bin").read_bytes())
    followed = follow_peer(push.sender_fqdn, first, first.roots, push.versions)
    assert followed.error is None and followed.state is not None
    assert followed.state.version > first.version
    offer = trust_service_pb2.SignedPeerMessage.FromString(
        (CORPUS / "peer_trust" / "offer.bin").read_bytes()
    )
    body = parse_message(offer, trust_service_pb2.PEER_MESSAGE_KIND_OFFER)
    verify_signed(offer, roots_of(body), require_all=True)


# -- what the fuzzers found, at the status a caller sees ---------------------------------


def _at(timestamp: int) -> datetime.datetime:
    """The proof's own moment, so the signature check is reached; now if it has none."""
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.datetime.now(datetime.UTC)


def _crash(target: str) -> list[bytes]:
    return [p.read_bytes() for p in fuzzing.regressions(target)]


def test_a_csr_with_an_unknown_key_algorithm_or_version_is_invalid_argument() -> None:
    """cryptography raises UnsupportedAlgorithm for a key type it does not know (here
    1.3.35.112, a mangled Ed25519 OID) and InvalidVersion for a version past v1: both are
    not ValueError, and each escaped as an internal error."""
    for data in _crash("csr_intake"):
        with pytest.raises(InvalidArgument, match="CSR"):
            check_csr(data)


def test_a_bundle_or_trust_state_with_a_root_that_does_not_parse_is_refused() -> None:
    for data in _crash("init_bundle"):
        with pytest.raises(BundleError):
            load_bundle(data)
    for data in _crash("trust_state"):
        with pytest.raises(TrustStateError):
            load(data)


def test_a_renewal_chain_key_or_time_that_does_not_parse_is_refused() -> None:
    """One chain has a certificate version past v3 (InvalidVersion at load), one a key
    that does not parse (ValueError only when the proof is checked), and one a proof
    time past year 9999 (OSError from datetime)."""
    from keyplane.v1 import enrollment_service_pb2

    for data in _crash("renewal_proof"):
        request = enrollment_service_pb2.RenewWithProofRequest.FromString(data)
        with pytest.raises((InvalidArgument, Unauthenticated)):
            cert = presented_certificate(request.certificate_chain_pem.encode())
            check_renewal_proof(
                cert,
                request.csr,
                request.proof,
                "pki.test",
                request.proof_time,
                _at(request.proof_time),
            )


def test_a_signed_message_with_a_signer_that_does_not_parse_is_refused() -> None:
    trust = load((FIXTURES / "trust.bin").read_bytes())
    for data in _crash("signed_message"):
        signed = message_signing_service_pb2.SignedMessage.FromString(data)
        with pytest.raises(MessageVerificationError):
            verify_message(b"payload", signed, trust)


def test_a_trust_state_json_with_non_ascii_base64_is_refused() -> None:
    with pytest.raises(TrustStateError, match="not base64"):
        decode_file('{"signed": "é"}'.encode())


def test_a_peer_root_that_does_not_parse_is_refused() -> None:
    """What a peer may send: a root with a version past v3 in a trust-state version, and
    one without basic constraints in an offer."""
    first = load_state((FIXTURES / "trust-first.bin").read_bytes())
    push = trust_service_pb2.PushTrustStateRequest.FromString(
        (CORPUS / "peer_trust" / "push.bin").read_bytes()
    )
    from keyplane.v1 import trust_state_pb2

    version = push.versions[-1]
    body = trust_state_pb2.TrustStateBody.FromString(version.body)
    der = bytearray(body.roots[0].certificate_der)
    version_at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT INTEGER 2 (v3)
    der[version_at + 4] = 0x06
    body.roots[0].certificate_der = bytes(der)
    version.body = body.SerializeToString()
    followed = follow_peer(push.sender_fqdn, first, first.roots, [version])
    assert isinstance(followed.error, PermissionDenied), followed.error
    assert "no valid certificate" in str(followed.error)
