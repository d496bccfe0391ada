"""`make test-secrets`: a pytest plugin (-p tests.secret_scan_plugin) that runs tests with
debug logging on everywhere (this process's loggers, and every server and zone server
the tests start, through KEYPLANE_LOG_LEVEL), keeps each test's captured output and
log, and after the run searches all of it and every file the tests left under the
base temp dir for private key material (tests/secretscan.py). Any hit fails the run
and is listed in build/secret-scan/report.txt."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests import secretscan

OUT = Path(__file__).resolve().parent.parent / "build" / "secret-scan"


def pytest_configure(config: pytest.Config) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["KEYPLANE_LOG_LEVEL"] = "DEBUG"
    handler = logging.FileHandler(OUT / "this-process.log")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    (OUT / "captured.txt").write_text("")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    sections = [f"{name}\n{text}" for name, text in report.sections]
    if report.longrepr is not None:
        sections.append(f"failure\n{report.longreprtext}")
    if sections:
        with (OUT / "captured.txt").open("a") as out:
            out.write(f"== {report.nodeid} ({report.when})\n" + "\n".join(sections) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.softhsm import SO_PIN, USER_PIN

    logging.shutdown()
    needles = secretscan.Needles()
    needles.add_password("the SoftHSM user PIN", USER_PIN)
    needles.add_password("the SoftHSM SO PIN", SO_PIN)
    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    roots = [OUT] if base.resolve().is_relative_to(OUT) else [base, OUT]
    haystack, closed = secretscan.gather(roots, needles)
    haystack = [p for p in haystack if p.name != "report.txt"]
    hits = secretscan.scan(haystack, needles)
    size = sum(p.stat().st_size for p in haystack)
    lines = [
        f"searched {len(haystack)} files ({size / 1e6:.1f} MB) for {needles.keys} private "
        f"keys ({len(needles.found)} needles); {len(closed)} pki.db not opened "
        "(password-protected or damaged: their keys are not needles)",
        *(f"HIT {h.where}: {h.what}" for h in hits),
    ]
    (OUT / "report.txt").write_text("\n".join(lines) + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"secret scan: {lines[0]}; {len(hits)} hits")
        for line in lines[1:20]:
            reporter.write_line(line)
    if hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
