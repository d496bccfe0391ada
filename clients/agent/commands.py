"""`keyplane agent run|status|verify`: the agent's commands and their exit statuses."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from keyplane.clients import trust
from keyplane.clients.agent.errors import AgentError, EnrollmentRefused
from keyplane.clients.agent.files import STATUS_FILE, TRUST_FILE
from keyplane.clients.agent.runtime import EXIT_REVOKED, Agent
from keyplane.clients.bundle import BundleError, load_bundle
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.v1 import message_signing_service_pb2

PROG = "keyplane"

AGENT_HELP = """\
A client agent: enrolls once with an enrollment token, then renews its client TLS
certificate by itself (when the server says, and soon after a new root appears), follows
the signed trust state over mutual TLS, and verifies signed messages against it. Its key,
certificate and state live in --data-dir; a restart resumes without a token.
"""

RUN_HELP = """\
Enroll (first start, with --token) and run: renew the certificate, follow the trust
state. Stop it with SIGTERM or SIGINT.

When its certificate is revoked (the trust state lists its serial or its key, or a
renewal is refused as revoked; revoking a zone server revokes everything it issued),
the agent stops renewing, logs "revoked: re-enroll with a new token", shows state
"revoked" in 'keyplane agent status' and exits with status 3, then again at every
start. Its data dir is left as it is: to enroll again, move it aside and start the
agent with a new token.
"""

RUN_EPILOG = """\
exit status: 0 stopped by SIGTERM/SIGINT; 1 enrollment refused or failed; 2 a bad
bundle, data dir or option; 3 its certificate is revoked (re-enroll with a new token).

example:
  keyplane agent run --data-dir var-agent --bundle keyplane-init.dat \\
      --token "$(keyplane tokens create)" --fingerprint <root fingerprint>
"""


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _prepare_data_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s keyplane agent: %(message)s",
        stream=sys.stderr,
    )
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read the init bundle {args.bundle}: {exc.strerror}", 2)
    try:
        bundle = load_bundle(data, args.fingerprint)
    except BundleError as exc:
        return _fail(f"the init bundle {args.bundle} is refused: {exc}", 2)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _prepare_data_dir(args.data_dir)
        agent = Agent(args.data_dir, bundle, args.name, args.time_scale, stop)
    except AgentError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"cannot use the data dir {args.data_dir}: {exc.strerror}", 2)
    if agent.revoked is None and not agent.enrolled:
        try:
            if not agent.enroll(args.token or ""):
                return 0
        except EnrollmentRefused as exc:
            return _fail(str(exc), 1)
        except AgentError as exc:
            return _fail(f"enrollment failed: {exc}", 1)
        except OSError as exc:
            return _fail(f"cannot save the certificate in {args.data_dir}: {exc.strerror}", 1)
    if agent.revoked is None:
        agent.run()
    revoked = agent.revoked
    if revoked is not None:
        return _fail(
            f"{revoked}; the data dir {args.data_dir} is kept as it is: move it aside and "
            "start 'keyplane agent run' with a new --token",
            EXIT_REVOKED,
        )
    return 0


def _read_status(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STATUS_FILE).read_text())
    except FileNotFoundError:
        raise AgentError(
            f"no agent in {directory} (no {STATUS_FILE}); start one with 'keyplane agent run'"
        ) from None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read {directory / STATUS_FILE}: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(f"{directory / STATUS_FILE} is damaged")
    return data


def cmd_status(args: argparse.Namespace) -> int:
    try:
        data = _read_status(args.data_dir)
    except AgentError as exc:
        return _fail(str(exc), 2)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    endpoint = data.get("endpoint") or {}
    rows = [
        ("name", data.get("name")),
        ("state", data.get("state")),
        ("serial", data.get("serial")),
        ("not after", data.get("not_after")),
        ("renew after", data.get("renew_after")),
        ("chain root", data.get("chain_root_fingerprint")),
        ("trusted roots", ", ".join(data.get("trusted_roots") or [])),
        ("trust state", data.get("trust_state_version")),
        ("endpoint", f"{endpoint.get('name', '')} {endpoint.get('listen', '')}".strip()),
        ("server in use", _in_use(data)),
        ("renewals", data.get("renewals")),
        ("last error", data.get("last_error")),
        ("updated", data.get("updated")),
    ]
    for label, value in rows:
        print(f"{label + ':':21}{'-' if value is None or value == '' else value}")
    return 0


def _in_use(data: dict[str, Any]) -> str:
    """Which server the agent uses now: its own, or a peer while its own does not answer."""
    using = data.get("server_in_use") or {}
    where = f"{using.get('name', '')} {using.get('listen', '')}".strip()
    return f"{where} (peer: its own server does not answer)" if using.get("peer") else where


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        state_bytes = (args.data_dir / TRUST_FILE).read_bytes()
    except FileNotFoundError:
        return _fail(
            f"no trust state in {args.data_dir} (start the agent with 'keyplane agent run' "
            "and let it follow the trust state)",
            2,
        )
    except OSError as exc:
        return _fail(f"cannot read {args.data_dir / TRUST_FILE}: {exc.strerror}", 2)
    try:
        state = trust.load(state_bytes)
    except Exception:  # protobuf's DecodeError or TrustStateError
        return _fail(f"{args.data_dir / TRUST_FILE} is damaged", 2)
    try:
        payload = args.file.read_bytes()
        signature = args.signature.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}", 2)
    try:
        signed = message_signing_service_pb2.SignedMessage.FromString(signature)
    except Exception:  # protobuf's DecodeError
        return _fail(f"signature rejected: {args.signature} is not a keyplane signature file", 1)
    try:
        verified = verify_message(payload, signed, state)
    except MessageVerificationError as exc:
        return _fail(f"signature rejected: {exc}", 1)
    signed_at = verified.signed_at.isoformat()
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "signer_fingerprint": verified.signer_fingerprint,
                    "signer_subject": verified.signer_subject,
                    "root_fingerprint": verified.root_fingerprint,
                    "signed_at": signed_at,
                    "trust_state_version": state.version,
                },
                indent=2,
            )
        )
    else:
        print(
            f"OK: signed by {verified.signer_subject} at {signed_at} "
            f"(root {verified.root_fingerprint[:16]}…, trust state v{state.version})"
        )
    return 0


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("the time scale must be a positive number")
    return value


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `keyplane agent run|status|verify` to the CLI."""
    agent = commands.add_parser(
        "agent",
        help="run a client agent (enroll, renew, follow trust)",
        description=AGENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = agent.add_subparsers(dest="verb", metavar="VERB", required=True)
    data_dir_help = "the agent's directory: key, certificate, trust state, status (mode 0700)"

    p = verbs.add_parser(
        "run",
        help="enroll (first start) and run: renew, follow the trust state; stop with SIGTERM",
        description=RUN_HELP,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle",
        type=Path,
        required=True,
        help="the init bundle (keyplane-init.dat from 'keyplane bundle download')",
    )
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument(
        "--token",
        help="enrollment token from 'keyplane tokens create' (first start only; a restart "
        "with a valid certificate does not need it)",
    )
    p.add_argument(
        "--fingerprint",
        help="the root fingerprint to expect in the bundle (sha256:HEX or HEX); "
        "a bundle without it is refused",
    )
    p.add_argument(
        "--name",
        help="the certificate's common name (default: agent-<8 hex>, kept in the data dir)",
    )
    p.add_argument(
        "--time-scale",
        type=_time_scale,
        default=1.0,
        metavar="N",
        help="wait (renew_after - now) / N seconds before renewing (for tests; default 1)",
    )
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("status", help="show what the agent in --data-dir holds and does")
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser(
        "verify",
        help="verify a signed file against the agent's trust state (offline)",
    )
    p.add_argument("file", type=Path, help="the signed file")
    p.add_argument("signature", type=Path, help="its signature (FILE.sig from 'keyplane sign')")
    p.add_argument("--data-dir", type=Path, required=True, help=data_dir_help)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_verify)
