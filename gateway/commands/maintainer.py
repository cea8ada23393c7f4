"""``medgw maintainer add``: a personal maintenance account, its TOTP secret shown once."""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import qrcode

from gateway.commands import add_config_option
from gateway.config.maintenance import PERSON, ROLES, parse_public_key
from gateway.errors import MedgwError
from gateway.maintenance import totp


class AccountError(MedgwError):
    """An account that cannot be written as asked."""


def register(commands: Any) -> None:
    maintainer = commands.add_parser("maintainer", help="personal remote maintenance accounts")
    actions = maintainer.add_subparsers(dest="maintainer_command", required=True, metavar="COMMAND")
    add = actions.add_parser(
        "add",
        help="write maintainers.d/PERSON.toml and show the TOTP secret once (reload to apply)",
    )
    add.add_argument("person", help="the SSH user name: lower-case letters, digits, . _ -")
    add.add_argument("--name", help="the person's full name (default: PERSON)")
    add.add_argument("--role", required=True, choices=ROLES, help="what the person may do")
    add.add_argument(
        "--key", required=True, type=Path, help="the person's OpenSSH public key file (.pub)"
    )
    add.add_argument(
        "--expires", required=True, help="the last day the account may log in (YYYY-MM-DD)"
    )
    add.add_argument(
        "--totp-algorithm",
        choices=tuple(totp.ALGORITHMS),
        default="sha1",
        help="sha1 (default: every authenticator app) or sha256",
    )
    add_config_option(add)
    add.set_defaults(handler=_add)


def _folder_and_issuer(config: Path) -> tuple[Path, str]:
    """``[maintenance] maintainers_dir`` (resolved as the loader does) and the gateway's
    name, read without validating the rest: the first account comes before the folder."""
    try:
        with config.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AccountError(f"cannot read {config}: {exc}", fix="check --config") from None
    section = data.get("maintenance")
    if not isinstance(section, dict):
        raise AccountError(
            f"{config} has no [maintenance] table",
            fix="add [maintenance] (see README, Remote maintenance over SSH) first",
        )
    folder = Path(str(section.get("maintainers_dir", "maintainers.d"))).expanduser()
    gateway = data.get("gateway")
    name = gateway.get("name") if isinstance(gateway, dict) else None
    base = config.absolute().parent
    return (folder if folder.is_absolute() else base / folder), str(name or "medgw")


def _add(args: argparse.Namespace) -> int:
    if not PERSON.match(args.person):
        raise AccountError(
            f"{args.person!r} is not a usable SSH user name",
            fix="use lower-case letters, digits, '.', '_' or '-', starting with a letter",
        )
    try:
        expires = datetime.date.fromisoformat(args.expires)
    except ValueError:
        raise AccountError(
            f"--expires {args.expires!r} is not a date", fix="use YYYY-MM-DD"
        ) from None
    if expires < datetime.datetime.now(datetime.UTC).date():
        raise AccountError(f"--expires {expires} is in the past", fix="give a future date")
    try:
        line = args.key.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AccountError(f"cannot read {args.key}: {exc}", fix="give the .pub file") from None
    key, why = parse_public_key(line)
    if key is None:
        raise AccountError(f"{args.key}: {why}", fix="use an ECDSA P-256/P-384 or RSA-3072 key")
    folder, issuer = _folder_and_issuer(args.config)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{args.person}.toml"
    secret = totp.new_secret()
    name = (args.name or args.person).replace("\\", "").replace('"', "'")
    text = (
        f'name = "{name}"\nrole = "{args.role}"\npublic_keys = ["{line}"]\n'
        f'totp_secret = "{secret}"\ntotp_algorithm = "{args.totp_algorithm}"\n'
        f"expires = {expires.isoformat()}\n"
    )
    try:  # never over an existing account: its person would lose their authenticator
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AccountError(
            f"{path} exists", fix="remove it first (that ends the account) or choose another name"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    uri = totp.otpauth_uri(secret, args.person, issuer, args.totp_algorithm)
    code = qrcode.QRCode(border=1)
    code.add_data(uri)
    picture = io.StringIO()
    code.print_ascii(out=picture)
    sys.stdout.write(
        f"wrote {path} (mode 600): {args.person}, role {args.role}, key "
        f"{key.get_fingerprint('sha256')}, expires {expires}\n\n"
        "The one-time-code secret, shown this once (it is not shown again):\n"
        f"  secret: {secret}  (TOTP, {args.totp_algorithm.upper()}, 30 s, 6 digits)\n"
        f"  {uri}\n\n{picture.getvalue()}\n"
        "Scan it with the person's authenticator app, then `systemctl reload medgw`.\n"
        f"Approve work with `medgw maintenance approve {args.person} --until ... --reason ...`.\n"
    )
    return 0
