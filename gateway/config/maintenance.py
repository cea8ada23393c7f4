"""``[maintenance]`` in gateway.toml and the personal accounts in ``maintainers.d/``.

One ``<person>.toml`` per maintainer; the file's stem is the SSH user name.  The file
holds the person's TOTP secret, so it must be readable by its owner only, like a
private key.  Unknown keys are errors, as everywhere in the configuration.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from gateway.config.listeners import Listener
from gateway.config.zones import Zone
from gateway.emergency.credential import USER as BREAK_GLASS_USER
from gateway.fsutil import this_user
from gateway.maintenance import algorithms, totp
from gateway.tomlreader import Reader, Section

ROLES = ("viewer", "operator", "admin")
PERSON = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
MAX_KEYS = 16


@dataclass(frozen=True)
class Maintainer:
    """A person allowed to maintain the gateway over SSH."""

    person: str  # the SSH user name: the file's stem
    name: str  # the person's full name, for the audit trail's reader
    role: str  # "viewer", "operator" or "admin"
    public_keys: tuple[str, ...]  # OpenSSH public key lines, as written
    fingerprints: tuple[str, ...]  # SHA256:... of each key, in the same order
    totp_secret: bytes
    totp_algorithm: str  # "sha1" or "sha256"
    expires: datetime.date  # the last day the account may log in (UTC)
    source: Path

    def expired(self, today: datetime.date) -> bool:
        return today > self.expires


MAINTENANCE_LISTENER = "the SSH maintenance listener ([maintenance] listen)"


@dataclass(frozen=True)
class MaintenanceSettings:
    address: str
    port: int
    host_key_path: Path
    host_key: asyncssh.SSHKey
    maintainers_dir: Path
    maintainers: tuple[Maintainer, ...]
    viewer_without_approval: bool  # a viewer may log in outside an approved window
    idle_timeout_seconds: float
    max_connections: int
    # (zone, network) of every zone's egress: a connection from there is closed unheard.
    zone_networks: tuple[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network], ...] = ()

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.address, self.port

    def zone_of(self, remote: str) -> str | None:
        """The zone whose network ``remote`` is in (None for loopback: this host)."""
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return None
        if address.is_loopback:
            return None
        return next((zone for zone, net in self.zone_networks if address in net), None)

    def maintainer(self, person: str) -> Maintainer | None:
        return next((m for m in self.maintainers if m.person == person), None)


def load_maintenance(
    reader: Reader,
    section: Section,
    listeners: Sequence[Listener],
    zones: Sequence[Zone],
    api: tuple[str, int] | None,
) -> MaintenanceSettings | None:
    listen = section.string("listen", example='"192.0.2.20:2222"')
    where = _listen_address(section, listen, listeners, zones, api)
    key_path = reader.path(section.string("host_key", example='"certs/ssh_host_ecdsa_key"'))
    host_key = _host_key(reader, section, key_path)
    folder = reader.path(section.string("maintainers_dir", default="maintainers.d"))
    viewer = section.boolean("viewer_without_approval", default=False)
    idle = section.number("idle_timeout_seconds", default=900, minimum=10, maximum=86400)
    most = section.integer("max_connections", default=8, minimum=1, maximum=64)
    section.finish()
    maintainers: list[Maintainer] = []
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".toml")
    except (NotADirectoryError, FileNotFoundError):
        files = None
    except OSError as exc:  # a folder on the way this user may not enter, or list
        user = this_user()
        section.problem(
            "maintainers_dir",
            f"cannot list the folder {folder}: {exc.strerror} for user {user}, the user this "
            "command runs as",
            f"let the user medgw runs as enter every folder down to {folder} and list it "
            f"(namei -l {folder} shows each folder's owner and mode), or run this command as "
            "that user (sudo -u medgw ...)",
        )
        files = []
    if files is not None:
        for path in files:
            found = load_maintainer(reader, path)
            if found is not None:
                maintainers.append(found)
        _shared_keys(reader, maintainers)
    else:
        section.problem(
            "maintainers_dir",
            f"folder {folder} not found",
            "create it (mode 700) and add one <person>.toml per maintainer with "
            "`medgw maintainer add`",
        )
    if where is None or host_key is None:
        return None
    return MaintenanceSettings(
        where[0],
        where[1],
        key_path,
        host_key,
        folder,
        tuple(maintainers),
        viewer,
        idle,
        most,
        tuple((z.name, net) for z in zones for net in z.egress),
    )


def _shared_keys(reader: Reader, maintainers: Sequence[Maintainer]) -> None:
    """A key in two accounts is one key shared by two people (or one person with two
    accounts): the trail could not tell whose login it was."""
    owners: dict[str, Maintainer] = {}
    for account in maintainers:
        for fingerprint in account.fingerprints:
            first = owners.setdefault(fingerprint, account)
            if first is account:
                continue
            reader.add(
                account.source,
                "public_keys",
                f"key {fingerprint} is also a key of account {first.person!r} "
                f"({first.source}): a shared key makes the audit trail unable to tell "
                "who logged in",
                f"give each person a key of their own (ssh-keygen on their machine), and "
                f"remove this key from {account.source} or from {first.source}",
            )


def _listen_address(
    section: Section,
    value: str,
    listeners: Sequence[Listener],
    zones: Sequence[Zone],
    api: tuple[str, int] | None,
) -> tuple[str, int] | None:
    """``ADDRESS:PORT`` on an address of its own: never a zone listener's (a peer could
    reach it there) and never inside a zone's egress unless it is loopback (NET-7)."""
    fix = 'write listen = "ADDRESS:PORT" with an address of the management network'
    found = section.address_port("listen", value, fix)
    if found is None:
        return None
    host, address, port = found
    if address.is_unspecified:
        section.problem(
            "listen",
            f"{host} listens on every address, the zones' included",
            f"name the one address of the management network (or {_free_loopback(listeners)})",
        )
        return None
    problem = None
    for listener in listeners:
        try:
            theirs = ipaddress.ip_address(listener.address)
        except ValueError:
            continue
        if theirs == address or theirs.is_unspecified:
            problem = (
                f"{host} is also the address of listener {listener.name!r} (zone "
                f"{listener.zone!r}): the zone's peers could reach the maintenance port"
            )
    if api is not None and not address.is_loopback and str(address) == api[0]:
        problem = f"{host} is the local API's address"
    if not address.is_loopback:
        for zone in zones:
            if any(address in network for network in zone.egress):
                problem = (
                    f"{host} is inside the egress of zone {zone.name!r}: the maintenance "
                    "port would sit in a network peers use"
                )
    if problem is not None:
        section.problem(
            "listen",
            problem,
            "give maintenance an address of its own on the management network, outside "
            f"every zone's egress (or {_free_loopback(listeners)}, reached through a jump "
            "host)",
        )
        return None
    return str(address), port


def _free_loopback(listeners: Sequence[Listener]) -> str:
    """A loopback address no listener uses: the one to suggest in a fix."""
    taken = {listener.address for listener in listeners}
    return next(f"127.0.0.{n}" for n in range(1, 256) if f"127.0.0.{n}" not in taken)


def _host_key(reader: Reader, section: Section, path: Path) -> asyncssh.SSHKey | None:
    data = reader.read_file(section, "host_key", path, "the SSH host key of this gateway")
    if data is None:
        return None
    reader.check_private_mode(section, "host_key", path, "SSH host key")
    fix = f"create one with `ssh-keygen -t ecdsa -b 384 -N '' -f {path}`"
    try:
        key = asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        section.problem("host_key", f"{path} holds no readable private key ({exc})", fix)
        return None
    if key.get_algorithm() not in algorithms.HOST_KEY:
        section.problem(
            "host_key",
            f"{path} is a {key.get_algorithm()} key; the maintenance listener uses ECDSA "
            "P-256 or P-384 host keys (CRYPTREC)",
            fix,
        )
        return None
    return key


def parse_public_key(line: str) -> tuple[asyncssh.SSHKey | None, str]:
    """The key and '' when it is acceptable, else None and why not."""
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        return None, f"not an OpenSSH public key ({exc})"
    kind = key.get_algorithm()
    if kind not in algorithms.USER_KEY_TYPES:
        return None, (
            f"{kind} keys are not accepted: a maintainer's key is ECDSA P-256/P-384 or RSA "
            f"of at least {algorithms.RSA_MIN_BITS} bits"
        )
    pyca = getattr(key, "pyca_key", None)
    bits = getattr(pyca, "key_size", 0)
    if kind == "ssh-rsa" and bits < algorithms.RSA_MIN_BITS:
        return None, f"RSA keys need at least {algorithms.RSA_MIN_BITS} bits, this has {bits}"
    return key, ""


def load_maintainer(reader: Reader, path: Path) -> Maintainer | None:

    data = reader.load_toml(path)
    if data is None:
        return None
    section = Section(reader, path, "", data)
    person = path.stem
    if not PERSON.match(person):
        section.problem(
            "",
            f"{person!r} is not a usable SSH user name",
            "name the file <person>.toml with lower-case letters, digits, '.', '_' or '-'",
        )
    if person == BREAK_GLASS_USER:
        section.problem(
            "",
            f"{person!r} is the user name of the sealed break-glass credential",
            "name the person's file after the person (medgw emergency seal makes the "
            "break-glass credential)",
        )
    name = section.string("name", example='"Hanako Yamada"')
    role = section.choice("role", ROLES, default="viewer")
    lines = section.string_list("public_keys", empty_fix="add the person's OpenSSH public key")
    keys: list[str] = []
    fingerprints: list[str] = []
    if len(lines) > MAX_KEYS:
        section.problem("public_keys", f"{len(lines)} keys", f"keep at most {MAX_KEYS}")
    for line in lines[:MAX_KEYS]:
        key, why = parse_public_key(line)
        if key is None:
            section.problem("public_keys", why, "use an ECDSA P-256/P-384 or RSA-3072 key")
            continue
        keys.append(line.strip())
        fingerprints.append(key.get_fingerprint("sha256"))
    secret_text = section.string("totp_secret", example='"(printed by medgw maintainer add)"')
    algorithm = section.choice("totp_algorithm", tuple(totp.ALGORITHMS), default="sha1")
    secret = b""
    try:
        secret = totp.decode_secret(secret_text)
    except ValueError:
        section.problem("totp_secret", "is not base32", "create the account again")
    if secret_text and len(secret) < 16:
        section.problem(
            "totp_secret", "is shorter than 128 bits", "create the account again (160 bits)"
        )
    section.mark_seen("expires")
    expires = data.get("expires")
    if not isinstance(expires, datetime.date) or isinstance(expires, datetime.datetime):
        section.problem(
            "expires",
            "required: the last day the account may be used, as a TOML date",
            "add `expires = 2027-03-31` (no quotes)",
        )
        expires = None
    reader.check_private_mode(section, "totp_secret", path, "maintainer account file")
    section.finish()
    unusable = not PERSON.match(person) or person == BREAK_GLASS_USER
    if unusable or expires is None or not keys or len(secret) < 16:
        return None
    return Maintainer(
        person, name, role, tuple(keys), tuple(fingerprints), secret, algorithm, expires, path
    )
