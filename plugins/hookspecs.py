"""Hook specifications of keyplane's key-backend plugins (prefix `keyplane_`).

A plugin is a module or object with `@hookimpl` functions, registered by keyplane
itself (the built-ins) or found through the `keyplane.backends` entry-point group.
Only `keyplane.plugins.manager.KeyBackends` calls these hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pluggy

from keyplane.plugins.keys import KeyBackend

PROJECT = "keyplane"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def keyplane_backend_names() -> list[str]:  # type: ignore[empty-body]
    """Return the backend names this plugin provides (also their URI schemes).

    Called when keyplane lists the available backends and validates configuration.
    """


@hookspec(firstresult=True)
def keyplane_open_backend(
    name: str, options: Mapping[str, object], data_dir: Path
) -> KeyBackend | None:
    """Open the backend called `name` with its configuration `options`.

    Called once per configured backend when a server or tool starts. `data_dir` is
    where a backend may keep files. Return None only when `name` is not this
    plugin's; for its own name, raise `BackendConfigError` for bad options and
    `BackendUnavailableError`/`BackendAuthError` when the store cannot be opened.
    """
