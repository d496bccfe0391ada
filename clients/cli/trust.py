"""`keyplane trust request|list|approve|reject|revoke|history`: trust with a peer server
(active/active)."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli.output import print_json, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import trust_service_pb2

TRUST_HELP = """\
Trust between two keyplane servers (active/active). On server A:

  keyplane trust request --peer B-HOST:BOOTSTRAP-PORT --peer-fingerprint FP

where FP is one of B's root fingerprints, given by B's admin out of band. A checks that
the server at that address is B (its trust state signed by FP) and sends B a signed
request. Both admins then run 'keyplane trust list': each sees the request with both
servers' root fingerprints in full and the same six-digit comparison code; they read it
to each other, and B's admin runs 'keyplane trust approve ID' (or 'reject'). Trust
begins on both servers at once: each server's bundle and trust state carry the other's
roots and addresses, each admits the other's agents, and components fail over to the
peer while their own server does not answer. 'keyplane trust revoke PEER' on either
side ends it.
"""


def request_json(request: trust_service_pb2.TrustRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "direction": request.direction,
        "state": request.state,
        "peer": request.peer_fqdn,
        "peer_listen": request.peer_listen,
        "peer_bootstrap_listen": request.peer_bootstrap_listen,
        "peer_root_fingerprints": list(request.peer_root_fingerprints),
        "own_root_fingerprints": list(request.own_root_fingerprints),
        "comparison_code": request.comparison_code or None,
        "created": timestamp(request.create_time),
        "updated": timestamp(request.update_time),
    }


def peer_json(peer: trust_service_pb2.TrustedPeer) -> dict[str, Any]:
    return {
        "peer": peer.fqdn,
        "request_id": peer.request_id,
        "listen": peer.listen,
        "bootstrap_listen": peer.bootstrap_listen,
        "roots": [{"name": r.name, "fingerprint": r.fingerprint} for r in peer.roots],
        "approved_root_fingerprints": list(peer.approved_root_fingerprints),
        "trust_state_version": peer.trust_state_version,
        "last_update": timestamp(peer.last_update_time, peer.HasField("last_update_time")),
        "comparison_code": peer.comparison_code or None,
        "trusted_since": timestamp(peer.trusted_time, peer.HasField("trusted_time")),
    }


def event_json(event: trust_service_pb2.TrustEvent) -> dict[str, Any]:
    return {
        "time": timestamp(event.time),
        "event": event.event,
        "request_id": event.request_id,
        "peer": event.peer_fqdn,
        "actor": event.actor,
        "fingerprints": list(event.fingerprints),
        "detail": event.detail or None,
    }


def _fingerprints(label: str, fingerprints: list[str]) -> list[str]:
    lines = []
    for i, fp in enumerate(fingerprints or ["-"]):
        lines.append(f"  {(label + ':') if i == 0 else '':18}{fp}")
    return lines


def _print_request(request: trust_service_pb2.TrustRequest) -> None:
    data = request_json(request)
    print(f"request {data['id']} ({data['direction']}, {data['state']})")
    print(f"  {'peer:':18}{data['peer']} (listen {data['peer_listen']}, "
          f"bootstrap {data['peer_bootstrap_listen']})")  # fmt: skip
    print(f"  {'comparison code:':18}{data['comparison_code'] or '- (no nonce revealed yet)'}")
    for line in _fingerprints("peer's roots", data["peer_root_fingerprints"]):
        print(line)
    for line in _fingerprints("this server's", data["own_root_fingerprints"]):
        print(line)
    if data["direction"] == "incoming" and data["state"] == "pending":
        print(f"  {'next:':18}compare the code with the peer's admin, then "
              f"'keyplane trust approve {data['id']}' (or reject)")  # fmt: skip
    elif data["direction"] == "outgoing":
        print(f"  {'next:':18}the peer's admin compares the code and approves it there")


def _print_peer(peer: trust_service_pb2.TrustedPeer) -> None:
    data = peer_json(peer)
    print(f"peer {data['peer']} (trusted since {data['trusted_since']}, "
          f"its trust state v{data['trust_state_version']})")  # fmt: skip
    print(f"  {'listen:':18}{data['listen']} (bootstrap {data['bootstrap_listen']})")
    for i, root in enumerate(data["roots"]):
        print(f"  {'roots:' if i == 0 else '':18}{root['fingerprint']} {root['name']}")
    for line in _fingerprints("approved", data["approved_root_fingerprints"]):
        print(line)
    print(f"  {'comparison code:':18}{data['comparison_code'] or '-'}")


def cmd_trust_request(client: KeyplaneClient, args: argparse.Namespace) -> int:
    request = client.request_trust(args.peer, args.peer_fingerprint)
    if args.json:
        print_json(request_json(request))
        return 0
    _print_request(request)
    return 0


def cmd_trust_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    listing = client.list_trust()
    if args.json:
        print_json(
            {
                "requests": [request_json(r) for r in listing.requests],
                "peers": [peer_json(p) for p in listing.peers],
            }
        )
        return 0
    if not listing.requests and not listing.peers:
        print("no trust requests and no trusted peers")
    for request in listing.requests:
        _print_request(request)
    for peer in listing.peers:
        _print_peer(peer)
    return 0


def cmd_trust_approve(client: KeyplaneClient, args: argparse.Namespace) -> int:
    peer = client.approve_trust(args.id)
    if args.json:
        print_json(peer_json(peer))
    else:
        print(f"trusted {peer.fqdn} (request {peer.request_id}); it trusts this server too")
    return 0


def cmd_trust_reject(client: KeyplaneClient, args: argparse.Namespace) -> int:
    response = client.reject_trust(args.id, args.reason or "")
    if args.json:
        print_json({**request_json(response.request), "peer_told": response.peer_told})
    else:
        told = "was told" if response.peer_told else "will be told when it answers"
        print(f"rejected request {response.request.id} ({response.request.peer_fqdn} {told})")
    return 0


def cmd_trust_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    response = client.revoke_trust(args.peer, args.reason or "")
    if args.json:
        print_json({**request_json(response.request), "peer_told": response.peer_told})
    else:
        told = "was told" if response.peer_told else "will be told when it answers"
        print(f"revoked the trust with {response.request.peer_fqdn} (the peer {told})")
    return 0


def cmd_trust_history(client: KeyplaneClient, args: argparse.Namespace) -> int:
    history = client.list_trust(args.limit).history
    if args.json:
        print_json([event_json(e) for e in history])
        return 0
    if not history:
        print("no trust history")
    for event in map(event_json, history):
        print(f"{(event['time'] or '')[:19]}  {event['event']:15} {event['peer']}  "
              f"request {event['request_id']}  by {event['actor']}")  # fmt: skip
        for fp in event["fingerprints"]:
            print(f"    {fp}")
        if event["detail"]:
            print(f"    {event['detail']}")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    trust = commands.add_parser(
        "trust",
        help="trust with a peer server (active/active)",
        description=TRUST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = trust.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("request", parents=[common], help="ask a peer server for trust")
    p.add_argument("--peer", required=True, help="the peer's bootstrap listener, HOST:PORT")
    p.add_argument(
        "--peer-fingerprint",
        required=True,
        help="one of the peer's root fingerprints (from its admin, out of band)",
    )
    p.set_defaults(call=cmd_trust_request)
    p = verbs.add_parser(
        "list",
        parents=[common],
        help="requests under way and trusted peers, fingerprints and comparison codes",
    )
    p.set_defaults(call=cmd_trust_list)
    p = verbs.add_parser("approve", parents=[common], help="approve a peer's request")
    p.add_argument("id", help="the request id, as 'keyplane trust list' shows it")
    p.set_defaults(call=cmd_trust_approve)
    p = verbs.add_parser("reject", parents=[common], help="reject a request (either side)")
    p.add_argument("id", help="the request id")
    p.add_argument("--reason", help="why; kept in the history and the audit log")
    p.set_defaults(call=cmd_trust_reject)
    p = verbs.add_parser(
        "revoke", parents=[common], help="end the trust with a peer (its roots leave at once)"
    )
    p.add_argument("peer", help="the peer's fqdn (or the request id that set the trust up)")
    p.add_argument("--reason", help="why; kept in the history and the audit log")
    p.set_defaults(call=cmd_trust_revoke)
    p = verbs.add_parser("history", parents=[common], help="every step of trust with peers")
    p.add_argument("--limit", type=int, default=100, help="how many steps, newest (default 100)")
    p.set_defaults(call=cmd_trust_history)
