"""The client agent runtime (`keyplane agent run|status|verify`): enroll with a token, keep
the client certificate renewed (before it expires, and onto a new root), follow the signed
trust state, and verify signed messages against it.

Everything the agent holds lives in its data dir (mode 0700), each file written atomically:

    agent.json    its name (the certificate's CN) and the server it enrolled with
    key.pem       its private key (0600)          cert.pem     leaf + intermediate, PEM
    roots.pem     the roots sent with the cert    issued.json  serial, not_after, renew_after
    trust.bin     the newest verified trust state status.json  what `agent status` shows
    pending-renewal.json   the next certificate's key and CSR (0600), until it is saved

A renewal stages key.pem, cert.pem, roots.pem and issued.json in `.renewal/`, marks the set
complete, then moves each file into place; a start that finds a complete set finishes the
move, so a crash never leaves a key beside a certificate for another key. The new key is
made once per certificate and kept until its certificate is saved: a renewal whose answer
was lost is asked again for the same key, and the server answers it with the same
certificate (a certificate renews once).

The package's rooms: files (the data dir and the staged swap), keys (keys, CSRs and what
the server sent), runtime (the Agent and its threads), commands (`keyplane agent ...`).
"""

from keyplane.clients.agent.commands import cmd_run, cmd_status, cmd_verify, register
from keyplane.clients.agent.errors import AgentError, EnrollmentRefused
from keyplane.clients.agent.files import (
    AGENT_FILE,
    CERT_FILE,
    CREDENTIAL_FILES,
    ISSUED_FILE,
    KEY_FILE,
    PENDING_FILE,
    ROOTS_FILE,
    STAGED_COMPLETE,
    STAGING_DIR,
    STATUS_FILE,
    TRUST_FILE,
    endpoint_json,
    finish_staged_swap,
    load_issued,
    save_issued,
    write_atomic,
)
from keyplane.clients.agent.keys import Issued, chain_root, issued_from, new_key_and_csr
from keyplane.clients.agent.runtime import (
    EXIT_REVOKED,
    REVOKED,
    TRANSIENT_CODES,
    Agent,
    Backoff,
    says_revoked,
)

__all__ = [
    "AGENT_FILE",
    "CERT_FILE",
    "CREDENTIAL_FILES",
    "EXIT_REVOKED",
    "ISSUED_FILE",
    "KEY_FILE",
    "PENDING_FILE",
    "REVOKED",
    "ROOTS_FILE",
    "STAGED_COMPLETE",
    "STAGING_DIR",
    "STATUS_FILE",
    "TRANSIENT_CODES",
    "TRUST_FILE",
    "Agent",
    "AgentError",
    "Backoff",
    "EnrollmentRefused",
    "Issued",
    "chain_root",
    "cmd_run",
    "cmd_status",
    "cmd_verify",
    "endpoint_json",
    "finish_staged_swap",
    "issued_from",
    "load_issued",
    "new_key_and_csr",
    "register",
    "save_issued",
    "says_revoked",
    "write_atomic",
]
