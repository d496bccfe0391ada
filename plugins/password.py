"""The software backend's database password: where it comes from, where a new one goes,
and the key-derivation parameters pki.db may use.

A new password is written beside its file (`<password_file>.new`, fsynced) before pki.db
is re-sealed, and replaces the file only after; a start finds whichever of the two opens
pki.db, so a crash at any step leaves the old or the new password working. Only a file
can take a new password: an environment variable, or a password given at unlock, cannot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from keyplane.plugins.errors import (
    BackendConfigError,
    BackendUnavailableError,
    PasswordSinkError,
)

# scrypt cost: about 32 MiB and a tenth of a second, paid once per open.
SCRYPT_PARAMS = {"n": 2**15, "r": 8, "p": 1}
# A pki.db whose header asks for less than this is refused when opened: its keys would be
# only as safe as a cheap guess at the password. The ceiling keeps a forged header from
# making an open take all memory or forever.
SCRYPT_FLOOR = {"n": 2**15, "r": 8, "p": 1}
SCRYPT_CEILING = {"n": 2**20, "r": 16, "p": 16}
MIN_SALT_BYTES = 16

CONFIGURE_A_SINK = (
    "point password_file in [backends.software] of the server's config (or keyplane serve "
    "--password-file FILE) at a file in a directory the server can write, restart the "
    "server, and set the password again"
)


class Password:
    """A password handed to a backend in memory (at unlock, or to a worker). Its repr
    never shows it, so a logged config or a traceback cannot leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Password(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[Password], tuple[bytes]]:
        # Pickled only through multiprocessing's pipe to a worker (never argv or env).
        return (Password, (self._value,))


def backends_with_password(
    configured: Mapping[str, Mapping[str, object]], password: Password | None
) -> Mapping[str, Mapping[str, object]]:
    """The backends' options with `password` handed to the software backend (in memory:
    a config file cannot hold a Password)."""
    if password is None:
        return configured
    software = {**configured.get("software", {}), "password": password}
    return MappingProxyType({**configured, "software": MappingProxyType(software)})


def check_kdf_params(params: object, salt: bytes) -> dict[str, int]:
    """The scrypt parameters of a pki.db header, refused below the floor or above the
    ceiling (BackendUnavailableError, naming what is wrong)."""
    if not isinstance(params, dict) or set(params) != {"n", "r", "p"}:
        raise BackendUnavailableError(
            "software backend: the PKI database's key-derivation parameters are not "
            "scrypt n, r, p; it was not made by keyplane"
        )
    values = {k: params[k] for k in ("n", "r", "p")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        raise BackendUnavailableError(
            "software backend: the PKI database's key-derivation parameters are not numbers"
        )
    n, r, p = values["n"], values["r"], values["p"]
    weak = (
        n < SCRYPT_FLOOR["n"]
        or r < SCRYPT_FLOOR["r"]
        or p < SCRYPT_FLOOR["p"]
        or len(salt) < MIN_SALT_BYTES
    )
    if weak:
        raise BackendUnavailableError(
            f"software backend: the PKI database's key derivation (scrypt n={n}, r={r}, "
            f"p={p}, {len(salt)}-byte salt) is below the safe floor (n >= {SCRYPT_FLOOR['n']}, "
            f"r >= {SCRYPT_FLOOR['r']}, p >= 1, a {MIN_SALT_BYTES}-byte salt); refusing to "
            "open it. Restore a pki.db made by keyplane"
        )
    if n & (n - 1) or n > SCRYPT_CEILING["n"] or r > SCRYPT_CEILING["r"]:
        raise BackendUnavailableError(
            f"software backend: the PKI database's key derivation (scrypt n={n}, r={r}) is "
            "not one keyplane makes (n a power of two up to 2^20, r up to 16)"
        )
    if p > SCRYPT_CEILING["p"]:
        raise BackendUnavailableError(
            f"software backend: the PKI database's scrypt p={p} is above {SCRYPT_CEILING['p']}"
        )
    return values


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (0600, never over an existing file) holding `data`, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a create, rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_password_file(path: Path) -> bytes | None:
    """The password in `path`; None when the file does not exist."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise BackendConfigError("software backend: password_file is not text") from None
    except OSError as exc:
        raise BackendConfigError(
            f"software backend: cannot read password_file ({exc.strerror})"
        ) from None
    if not value:
        raise BackendConfigError("software backend: password_file is empty")
    return value.encode()


@dataclass(frozen=True)
class PasswordSource:
    """Where the database password comes from (`password_file`, `password_env`, or a
    Password given in memory), and so where a new one can go: only to a file."""

    file: Path | None = None
    env: str | None = None
    given: Password | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> PasswordSource:
        env_name = options.get("password_env")
        file_name = options.get("password_file")
        given = options.get("password")
        if env_name and file_name:
            raise BackendConfigError(
                "software backend: set password_env or password_file, not both"
            )
        if given is not None and not isinstance(given, Password):
            raise BackendConfigError(
                "software backend: the password cannot be written in the config file; use "
                "password_file or password_env, or start locked and run keyplane unlock"
            )
        return cls(
            file=Path(str(file_name)) if file_name else None,
            env=str(env_name) if env_name else None,
            given=given,
        )

    @property
    def configured(self) -> bool:
        return self.file is not None or self.env is not None or self.given is not None

    @property
    def staged(self) -> Path | None:
        """Where a new password waits, beside the file, until pki.db is re-sealed."""
        return self.file.with_name(self.file.name + ".new") if self.file else None

    def current(self) -> bytes | None:
        """The password given, from the environment, or in the file (None if the file
        does not exist yet)."""
        if self.given is not None:
            return self.given.reveal()
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise BackendConfigError(
                    f"software backend: environment variable {self.env} (password_env) is not set"
                )
            return value.encode()
        if self.file is not None:
            return _read_password_file(self.file)
        return None

    def staged_password(self) -> bytes | None:
        """The new password of a change that a crash interrupted, if one waits."""
        staged = self.staged
        if staged is None:
            return None
        try:
            return _read_password_file(staged)
        except BackendConfigError:
            return None  # a half-written staged file is never the one pki.db needs

    def candidates(self) -> list[tuple[str, bytes]]:
        """(origin, password) pairs a start tries, the configured password first."""
        found = []
        current = self.current()
        if current is not None:
            found.append(("configured", current))
        staged = self.staged_password()
        if staged is not None:
            found.append(("staged", staged))
        return found

    def writable_file(self) -> Path:
        """The file a new password goes to; PasswordSinkError, saying how to configure
        one, when there is none keyplane can write."""
        if self.env is not None:
            raise PasswordSinkError(
                f"the database password comes from the environment variable {self.env} "
                "(password_env), which keyplane cannot update, so the change would lock the "
                f"next start out; nothing was changed. To change it, {CONFIGURE_A_SINK}"
            )
        if self.file is None:
            raise PasswordSinkError(
                "no password_file is configured, so a new database password would be written "
                f"nowhere and the next start would be locked out; nothing was changed. "
                f"To change it, {CONFIGURE_A_SINK}"
            )
        if not self.file.parent.is_dir():
            raise PasswordSinkError(
                "the directory of password_file does not exist, so the new database "
                "password cannot be written there; nothing was changed. Create the "
                "directory (writable by the server) and try again"
            )
        return self.file

    def stage(self, new_password: bytes) -> Path:
        """Write the new password beside the file, durably; PasswordSinkError if it
        cannot be written (nothing is left behind then)."""
        target = self.writable_file()
        staged = target.with_name(target.name + ".new")
        try:
            staged.unlink(missing_ok=True)
            write_private_file(staged, new_password + b"\n")
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
            raise PasswordSinkError(
                f"the new database password cannot be written beside password_file "
                f"({exc.strerror}); nothing was changed. Make its directory writable by the "
                "server and try again"
            ) from None
        return staged

    def commit(self, staged: Path) -> None:
        """Put the staged password in place of the file, atomically and durably."""
        assert self.file is not None  # noqa: S101 - staged only with a file
        os.replace(staged, self.file)
        fsync_directory(self.file.parent)

    def discard_staged(self) -> None:
        """Drop a staged password that pki.db was never re-sealed with."""
        staged = self.staged
        if staged is not None and staged.exists():
            staged.unlink()
            fsync_directory(staged.parent)


@contextlib.contextmanager
def change_lock(database: Path) -> Iterator[None]:
    """Held (across processes: `--workers`) by a password change from staging to the end,
    and by anything that reads or settles the password files, so none sees a change half
    made. Always taken before pki.db's own write lock."""
    lock_path = database.with_name(database.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
