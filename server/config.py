"""Server configuration: a frozen object read from TOML, every option with a default.

Example (all keys optional):

    fqdn = "pki.example.org"
    data_dir = "/var/lib/keyplane"
    listen = "0.0.0.0:7443"
    bootstrap_listen = "0.0.0.0:7444"
    crl_listen = "0.0.0.0:8080"   # CRLs over plain HTTP; default: off
    console_listen = "127.0.0.1:7445"   # the admin console (HTTPS); off when unset
    server_names = ["pki.example.org"]
    root_algorithm = "ec-p256"
    subordinate_algorithm = "ec-p256"
    metrics_listen = "127.0.0.1:9443"   # GET /metrics; default off
    log_format = "json"                 # or "text"

    [key_backends]           # key kind -> backend name
    root = "pkcs11"

    [backends.software]      # options of each backend
    password_file = "/etc/keyplane/pki-db-password"

    [backends.pkcs11]
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token = "keyplane"
    pin_file = "/etc/keyplane/hsm-pin"
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from keyplane.plugins.errors import UnsupportedAlgorithmError
from keyplane.plugins.keys import KeyAlgorithm
from keyplane.server.errors import ConfigError
from keyplane.server.grpc_options import MIN_PING_INTERVAL_MS
from keyplane.server.logs import LOG_FORMATS

DEFAULT_LISTEN = "127.0.0.1:7443"
# Steps of root and subordinate rotation at which a test may have the server SIGKILL
# itself ([testing] kill_at; see server/domain/faults.py).
ROTATION_KILL_POINTS = (
    "root.generated",
    "root.recorded",
    "revoke.recorded",
    "subordinate.generated",
    "subordinate.prepared",
    "subordinate.published",
    "subordinate.activated",
    "trust.signed",
)
# Steps of a database password change (the software backend's change_password).
PASSWORD_KILL_POINTS = (
    "password.staged",
    "password.resealed",
    "password.replaced",
    "password.keyfile_removed",
)
# ...and of a start: the key backends are open (pki.db made), the state DB not yet.
KILL_POINTS = (*ROTATION_KILL_POINTS, "start.backends_opened", *PASSWORD_KILL_POINTS)
# Where a test may have the key backend fail ([testing] fail_at).
FAIL_POINTS = ("trust.sign",)
KEY_KINDS = ("root", "legacy_root", "server_tls", "intermediate_tls", "message_signing")
# The legacy root never lives in an HSM: it is pinned to the software backend.
PINNED_KINDS = MappingProxyType({"legacy_root": "software"})


def parse_address(text: str, what: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); ConfigError naming `what` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:7443), not {text!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to start; build with `load_config`."""

    data_dir: Path = Path("var")
    fqdn: str = field(default_factory=socket.getfqdn)
    listen: str = DEFAULT_LISTEN
    bootstrap_listen: str = ""
    # CRLs over plain HTTP (server/crl_http.py); empty: not served.
    crl_listen: str = ""
    # The admin console's HTTPS listener (server/console/); "" serves none.
    console_listen: str = ""
    server_names: tuple[str, ...] = ()
    root_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    subordinate_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    key_backends: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(KEY_KINDS, "software"))
    )
    backends: Mapping[str, Mapping[str, object]] = field(
        default_factory=lambda: MappingProxyType({"software": MappingProxyType({})})
    )
    rotation_check_seconds: float = 60.0
    # How often who was seen (admitted calls, renewals, watches) is written, in one batch.
    sightings_seconds: float = 30.0
    # Calls served at once per listener, and trust-state watch streams per process:
    # beyond them RESOURCE_EXHAUSTED at once.
    max_calls_per_listener: int = 1024
    max_streams: int = 50_000
    # Serving processes under a supervisor (--workers); None: one process, unsupervised.
    workers: int | None = None
    # Prometheus text on GET /metrics at this HOST:PORT (--metrics-listen); "": off.
    metrics_listen: str = ""
    # How the log reads: "text" (a line per record) or "json" (an object per line).
    log_format: str = "text"
    # How often each serving process checks its key backends (an HSM may go away):
    # health answers NOT_SERVING while one does not answer.
    backend_check_seconds: float = 10.0
    # Testing only: the crash point (server/domain/faults.py) at which to SIGKILL itself.
    kill_at: str = ""
    # Testing only: the failure point (server/domain/faults.py) at which the backend fails.
    fail_at: str = ""
    # Testing only: the failure point at which the backend is this many ms slow.
    slow_at: str = ""
    slow_ms: int = 0
    # Testing only: the group-commit thread dies after this many batches (a fault hook).
    commit_thread_dies_after: int | None = None
    # Testing only: the least time between a client's data-less pings the server allows.
    min_ping_interval_ms: int = MIN_PING_INTERVAL_MS

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen, "listen")

    @property
    def bootstrap_address(self) -> tuple[str, int]:
        """The bootstrap listener: configured, else the port after `listen` (0 stays 0)."""
        if self.bootstrap_listen:
            return parse_address(self.bootstrap_listen, "bootstrap_listen")
        host, port = self.listen_address
        return host, (port + 1 if port else 0)

    @property
    def crl_address(self) -> tuple[str, int] | None:
        return parse_address(self.crl_listen, "crl_listen") if self.crl_listen else None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The metrics endpoint's address, or None when metrics are off."""
        return parse_address(self.metrics_listen, "metrics_listen") if self.metrics_listen else None

    @property
    def console_address(self) -> tuple[str, int] | None:
        """The console's listener, or None when the console is off."""
        if not self.console_listen:
            return None
        return parse_address(self.console_listen, "console_listen")

    def backend_for(self, kind: str) -> str:
        return self.key_backends[kind]


def _known(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(sorted(unknown))}")


def _algorithm(value: object, what: str) -> KeyAlgorithm:
    try:
        return KeyAlgorithm.parse(str(value))
    except UnsupportedAlgorithmError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Read a TOML file (optional) and apply command-line overrides (None = not given)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path.name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path.name} is not text (TOML is UTF-8)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path.name} is not valid TOML: {exc}") from None
    top = {
        "fqdn",
        "data_dir",
        "listen",
        "bootstrap_listen",
        "crl_listen",
        "console_listen",
        "server_names",
        "root_algorithm",
        "subordinate_algorithm",
        "key_backends",
        "backends",
        "rotation_check_seconds",
        "sightings_seconds",
        "max_calls_per_listener",
        "max_streams",
        "workers",
        "metrics_listen",
        "log_format",
        "backend_check_seconds",
        "testing",
    }
    _known(raw, top, "the config file")
    config = ServerConfig()
    values: dict[str, Any] = {}
    for name in (
        "fqdn",
        "listen",
        "bootstrap_listen",
        "crl_listen",
        "metrics_listen",
        "console_listen",
    ):
        if name in raw:
            values[name] = str(raw[name])
    if "data_dir" in raw:
        values["data_dir"] = Path(str(raw["data_dir"]))
    if "server_names" in raw:
        values["server_names"] = tuple(str(n) for n in raw["server_names"])
    for name in ("root_algorithm", "subordinate_algorithm"):
        if name in raw:
            values[name] = _algorithm(raw[name], name)
    for name in ("rotation_check_seconds", "backend_check_seconds", "sightings_seconds"):
        if name in raw:
            seconds = raw[name]
            if not isinstance(seconds, int | float) or seconds <= 0:
                raise ConfigError(f"{name} must be a positive number")
            values[name] = float(seconds)
    if "log_format" in raw:
        values["log_format"] = str(raw["log_format"])
    for name in ("max_calls_per_listener", "max_streams"):
        if name in raw:
            limit = raw[name]
            if not isinstance(limit, int) or not 1 <= limit <= 1_000_000:
                raise ConfigError(f"{name} must be a whole number from 1 to 1000000")
            values[name] = limit
    if "workers" in raw:
        workers = raw["workers"]
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ConfigError("workers must be a whole number from 1 to 64")
        values["workers"] = workers
    testing = dict(raw.get("testing", {}))
    _known(
        testing,
        {
            "kill_at",
            "fail_at",
            "slow_at",
            "slow_ms",
            "commit_thread_dies_after",
            "min_ping_interval_ms",
        },
        "[testing]",
    )
    if "fail_at" in testing:
        if testing["fail_at"] not in FAIL_POINTS:
            raise ConfigError(f"[testing] fail_at must be one of: {', '.join(FAIL_POINTS)}")
        values["fail_at"] = str(testing["fail_at"])
    if "slow_at" in testing:
        slow_ms = testing.get("slow_ms")
        if testing["slow_at"] not in FAIL_POINTS or not isinstance(slow_ms, int) or slow_ms < 1:
            raise ConfigError(
                f"[testing] slow_at must be one of: {', '.join(FAIL_POINTS)}, with slow_ms "
                "a positive whole number of milliseconds"
            )
        values["slow_at"], values["slow_ms"] = str(testing["slow_at"]), slow_ms
    if "min_ping_interval_ms" in testing:
        interval = testing["min_ping_interval_ms"]
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError("[testing] min_ping_interval_ms must be a positive whole number")
        values["min_ping_interval_ms"] = interval
    if "kill_at" in testing:
        if testing["kill_at"] not in KILL_POINTS:
            raise ConfigError(f"[testing] kill_at must be one of: {', '.join(KILL_POINTS)}")
        values["kill_at"] = str(testing["kill_at"])
    if "commit_thread_dies_after" in testing:
        batches = testing["commit_thread_dies_after"]
        if not isinstance(batches, int) or batches < 0:
            raise ConfigError("[testing] commit_thread_dies_after must be a whole number")
        values["commit_thread_dies_after"] = batches
    backends: dict[str, Mapping[str, object]] = {"software": MappingProxyType({})}
    for name, options in dict(raw.get("backends", {})).items():
        if not isinstance(options, dict):
            raise ConfigError(f"[backends.{name}] must be a table of options")
        backends[name] = MappingProxyType(dict(options))
    kinds = dict.fromkeys(KEY_KINDS, "software")
    chosen = dict(raw.get("key_backends", {}))
    _known(chosen, set(KEY_KINDS), "[key_backends]")
    for kind, backend in chosen.items():
        if kind in PINNED_KINDS and backend != PINNED_KINDS[kind]:
            raise ConfigError(f"[key_backends] {kind} always lives in {PINNED_KINDS[kind]!r}")
        if backend not in backends:
            raise ConfigError(
                f"[key_backends] {kind} = {backend!r}, but there is no [backends.{backend}] table"
            )
        kinds[kind] = str(backend)
    values["key_backends"] = MappingProxyType(kinds)
    values["backends"] = MappingProxyType(backends)
    for name, value in overrides.items():
        if value is not None:
            values[name] = Path(value) if name == "data_dir" else value
    config = replace(config, **values)
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of: {', '.join(LOG_FORMATS)}")
    config.listen_address  # noqa: B018 - validate the addresses now, not at bind time
    config.bootstrap_address  # noqa: B018
    config.crl_address  # noqa: B018
    config.metrics_address  # noqa: B018
    config.console_address  # noqa: B018
    return config
