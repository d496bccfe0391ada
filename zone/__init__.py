"""keyplane.zone: the zone-server runtime (`keyplane zone serve`).

A zone server is both a client of its keyplane server (it enrolls, follows the trust
state, reports what it issues) and a server for its own clients (it signs their CSRs
with its own intermediate). It composes keyplane.server and keyplane.clients, which
never import each other, so it lives in its own package above both.
"""
