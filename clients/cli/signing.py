"""`keyplane sign FILE…` and `keyplane verify FILE SIG`: detached message signatures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyplane.clients.cli import PROG, CliError, read_file
from keyplane.clients.cli.output import print_json, timestamp
from keyplane.clients.cli.trust_state import fetch_trust_state
from keyplane.clients.client import KeyplaneClient
from keyplane.clients.trust import TrustStateError
from keyplane.clients.trust import load as load_trust_state
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.v1 import message_signing_service_pb2

# The server's limits per SignMessages call.
SIGN_BATCH = 1000
SIGN_BATCH_BYTES = 4 * 1024 * 1024


def cmd_sign(client: KeyplaneClient, args: argparse.Namespace) -> int:
    files: list[Path] = args.file
    if args.out and len(files) > 1:
        raise CliError("--out names one signature file; with several files, leave it out")
    signed: list[message_signing_service_pb2.SignedMessage] = []
    if len(files) == 1:
        signed.append(client.sign_message(read_file(files[0])))
    else:
        # SignMessages: up to 1,000 payloads and 4 MiB per call.
        batch: list[bytes] = []
        for path in files:
            payload = read_file(path)
            if batch and (
                len(batch) == SIGN_BATCH or sum(map(len, batch)) + len(payload) > (SIGN_BATCH_BYTES)
            ):
                signed.extend(client.sign_messages(batch))
                batch = []
            batch.append(payload)
        signed.extend(client.sign_messages(batch))
    report = []
    for path, one in zip(files, signed, strict=True):
        out = args.out or path.with_name(path.name + ".sig")
        out.write_bytes(one.SerializeToString())
        content = message_signing_service_pb2.MessageSignatureContent.FromString(one.content)
        report.append(
            {
                "file": str(path),
                "signature_file": str(out),
                "signer_fingerprint": content.signer_fingerprint,
                "algorithm": one.algorithm,
                "signed_at": timestamp(content.signed_at),
                "trust_state_version": content.trust_state_version,
            }
        )
    if args.json:
        print_json(report[0] if len(report) == 1 else report)
    else:
        for entry in report:
            print(
                f"signed {entry['file']} -> {entry['signature_file']} "
                f"(key {str(entry['signer_fingerprint'])[:16]}…)"
            )
    return 0


def cmd_verify(client: KeyplaneClient | None, args: argparse.Namespace) -> int:
    """Verify against --trust-state (offline, `client` is None) or the server's latest."""
    payload = read_file(args.file)
    try:
        signed = message_signing_service_pb2.SignedMessage.FromString(read_file(args.signature))
    except Exception:  # protobuf's DecodeError
        raise CliError(f"{args.signature} is not a keyplane signature file") from None
    pins = [args.fingerprint] if args.fingerprint else []
    try:
        if args.trust_state:
            try:
                state = load_trust_state(read_file(args.trust_state), pins)
            except TrustStateError as exc:
                raise CliError(f"{args.trust_state}: {exc}") from None
        else:
            assert client is not None  # noqa: S101 - main() connects when no file is given
            state = fetch_trust_state(client, args.credential.root_certificates_pem)
        verified = verify_message(payload, signed, state)
    except (MessageVerificationError, TrustStateError) as exc:
        print(f"{PROG}: signature rejected: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(
            {
                "valid": True,
                "signer_fingerprint": verified.signer_fingerprint,
                "root_fingerprint": verified.root_fingerprint,
                "signed_at": verified.signed_at.isoformat(),
                "trust_state_version": state.version,
            }
        )
    else:
        print(
            f"OK: signed by {verified.signer_subject} at {verified.signed_at.isoformat()} "
            f"(root {verified.root_fingerprint[:16]}…, trust state v{state.version})"
        )
    return 0


def _verifies_offline(args: argparse.Namespace) -> bool:
    return args.trust_state is not None


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    sign_help = (
        "sign files (each at most 4 MiB) with the message-signing key; several files "
        "are signed in batches (SignMessages), up to 1,000 and 4 MiB per call"
    )
    p = commands.add_parser("sign", parents=[common], help=sign_help, description=sign_help)
    p.add_argument("file", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="signature file, for one FILE (default FILE.sig)")
    p.set_defaults(call=cmd_sign)

    p = commands.add_parser(
        "verify",
        parents=[common],
        help="verify a signed file against a trust state (offline with --trust-state)",
    )
    p.add_argument("file", type=Path)
    p.add_argument("signature", type=Path)
    p.add_argument(
        "--trust-state",
        type=Path,
        help="a trust state written by 'keyplane trust-state show --out' (binary) or printed "
        "by 'trust-state show --json'; without it the latest is fetched from the server",
    )
    p.add_argument(
        "--fingerprint",
        help="require the trust state to be signed by this root: all 64 hex digits (a pin, "
        "so no prefix)",
    )
    p.set_defaults(call=cmd_verify, offline=_verifies_offline)
