"""The admin console for tests: a real server with its console on 127.0.0.1, sign-in
links asked for over gRPC as a given identity, and a plain HTTPS client (the server's
certificate checked against the roots in ca.pem) that keeps one session cookie."""

from __future__ import annotations

import http.client
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyplane.clients.client import KeyplaneClient
from tests.serverkit import RunningServer

COOKIE = "__Host-keyplane-session"


def console_overrides(**overrides: Any) -> dict[str, Any]:
    return {"console_listen": "127.0.0.1:0", **overrides}


def console_url(server: RunningServer) -> str:
    url = server.server.console_url()
    assert url is not None, "the server runs no console"
    return str(url)


def sign_in_link(client: KeyplaneClient) -> str:
    """A one-time link for the identity `client` calls with."""
    return client.create_sign_in_link().url


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


@dataclass
class ConsoleHttp:
    """HTTPS to the console as a browser of this site would send it (Origin,
    Sec-Fetch-Site), unless told otherwise; keeps the session cookie it is given."""

    url: str
    roots: Path
    cookie: str = ""
    set_cookies: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.url

    def _connection(self) -> http.client.HTTPSConnection:
        parts = urllib.parse.urlsplit(self.url)
        context = ssl.create_default_context(cafile=str(self.roots))
        return http.client.HTTPSConnection(
            parts.hostname or "", parts.port, context=context, timeout=30
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        same_site: bool = True,
    ) -> Reply:
        sent = {}
        if same_site:
            sent["Sec-Fetch-Site"] = "same-origin"
            if method != "GET":
                sent["Origin"] = self.origin
        if self.cookie:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        sent.update(headers or {})
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            reply = Reply(response.status, response.headers, response.read().decode())
        finally:
            connection.close()
        for value in reply.headers.get_all("Set-Cookie") or []:
            self.set_cookies.append(value)
            name, _, rest = value.partition("=")
            if name == COOKIE:
                self.cookie = rest.split(";", 1)[0]
        return reply

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, fields: dict[str, str], **kwargs: Any) -> Reply:
        body = urllib.parse.urlencode(fields).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kwargs.pop("headers", {})}
        return self.request("POST", path, body=body, headers=headers, **kwargs)

    def sign_in(self, link: str) -> Reply:
        parts = urllib.parse.urlsplit(link)
        return self.get(f"{parts.path}?{parts.query}", headers={"Sec-Fetch-Site": "none"})

    def csrf(self, path: str = "/roots") -> str:
        """The form token the console puts in its pages' forms."""
        page = self.get(path)
        assert page.status == 200, page.body[:300]
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.body)
        assert found, "no form token on the page"
        return found.group(1)


def console_http(server: RunningServer) -> ConsoleHttp:
    return ConsoleHttp(console_url(server), server.admin_dir / "ca.pem")
