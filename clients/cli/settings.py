"""`keyplane settings list|get|set`: global and local settings."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli import rotation
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import settings_service_pb2

SETTINGS_HELP = """\
Settings, global (every server) or local (this server). Rotation settings:
PKI<Kind>KeyValidityHours and PKI<Kind>KeyRenewalWindowHours for Kind in ClientTLS
(168/4), IntermediateTLS, ServerTLS and MessageSigning (720/72). A renewal window must
be shorter than its validity. Protected values are masked unless --reveal (audited).
PKIRootRevocationMinCoverage (a share, 0.99) is what 'roots revoke' asks of coverage.
'set --dry-run' shows what a validity or window change does to the renewal forecast.
"""


def setting_json(setting: settings_service_pb2.Setting) -> dict[str, Any]:
    return {
        "name": setting.name,
        "value": setting.value,
        "type": settings_service_pb2.SettingType.Name(setting.type)
        .removeprefix("SETTING_TYPE_")
        .lower(),
        "affects": setting.affects,
        "scope": setting.scope,
        "default": setting.is_default,
        "description": setting.description,
        "updated": timestamp(setting.update_time, setting.HasField("update_time")),
        "updated_by": setting.updated_by or None,
    }


def cmd_settings_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    settings = [setting_json(s) for s in client.list_settings(args.reveal)]
    if args.json:
        print_json(settings)
        return 0
    header = ["NAME", "VALUE", "TYPE", "AFFECTS", "SCOPE", "DEFAULT"]
    rows = [
        [s["name"], s["value"], s["type"], s["affects"], s["scope"], "yes" if s["default"] else ""]
        for s in settings
    ]
    print(table(rows, header))
    return 0


def cmd_settings_get(client: KeyplaneClient, args: argparse.Namespace) -> int:
    setting = setting_json(client.get_setting(args.name, args.reveal))
    if args.json:
        print_json(setting)
    else:
        print(setting["value"])
    return 0


def cmd_settings_set(client: KeyplaneClient, args: argparse.Namespace) -> int:
    answer = client.change_setting(args.name, args.value, dry_run=args.dry_run)
    setting = setting_json(answer.setting)
    before = (
        rotation.summary_json(answer.forecast_before)
        if answer.HasField("forecast_before")
        else None
    )
    after = (
        rotation.summary_json(answer.forecast_after) if answer.HasField("forecast_after") else None
    )
    if args.json:
        if args.dry_run:
            setting = {
                **setting,
                "dry_run": True,
                "forecast_before": before,
                "forecast_after": after,
            }
        print_json(setting)
    elif args.dry_run:
        rotation.print_setting_trial(setting["name"], setting["value"], before, after)
    else:
        print(f"{setting['name']} = {setting['value']}")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    settings = commands.add_parser(
        "settings",
        help="read and change settings",
        description=SETTINGS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = settings.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="every setting and its value")
    p.add_argument("--reveal", action="store_true", help="show protected values (audited)")
    p.set_defaults(call=cmd_settings_list)
    p = verbs.add_parser("get", parents=[common], help="one setting's value")
    p.add_argument("name")
    p.add_argument("--reveal", action="store_true", help="show a protected value (audited)")
    p.set_defaults(call=cmd_settings_get)
    p = verbs.add_parser("set", parents=[common], help="change a setting")
    p.add_argument("name")
    p.add_argument("value")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the value and, for a validity or window, show the renewal forecast "
        "before and after; save nothing",
    )
    p.set_defaults(call=cmd_settings_set)
