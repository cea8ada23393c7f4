"""Reading the configuration's TOML files: typed values, and every problem collected.

A :class:`Section` is one table of one file; a :class:`Reader` reads the files a
configuration names (certificates, keys, CRLs) and collects every
:class:`~gateway.errors.ConfigProblem`, each naming the file, the key and the fix.
The sections of the configuration (gateway.config, and the loaders of
features such as [audit.export] and [maintenance]) are read with these.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.errors import ConfigProblem, PolicyError
from gateway.fsutil import read_admin_file
from gateway.pki.keypair import KeyPair, PrivateKey
from gateway.places import Place
from gateway.policy import (
    AlgorithmPolicy,
    certificate_key,
)

T = TypeVar("T")


class Section:
    """Reads typed keys out of one TOML table, collecting problems."""

    def __init__(self, reader: Reader, file: Path, prefix: str, table: dict[str, Any]) -> None:
        self._reader = reader
        self._file = file
        self._prefix = prefix
        self._table = table
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def problem(self, key: str, message: str, fix: str, severity: str = "error") -> None:
        self._reader.add(self._file, self._key(key), message, fix, severity)

    def where(self, key: str) -> tuple[Path, str]:
        """The file and the full key path of ``key`` in this table."""
        return self._file, self._key(key)

    def _get(
        self,
        key: str,
        kind: type[T] | tuple[type, ...],
        kind_name: str,
        default: T | None,
        required: bool,
        example: str,
    ) -> T | None:
        self._seen.add(key)
        if key not in self._table:
            if required:
                self.problem(key, "required key is missing", f"add `{key} = {example}`")
            return default
        value = self._table[key]
        # bool is an int in Python; never accept true/false where a number is meant.
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if not ok:
            self.problem(
                key,
                f"must be {kind_name}, found {type(value).__name__} {value!r}",
                f"write it as `{key} = {_as_kind(value, kind) or example}`",
            )
            return default
        return cast(T, value)

    def string(self, key: str, *, default: str | None = None, example: str = '"..."') -> str:
        value = self._get(key, str, "a string", default, default is None, example)
        return value if value is not None else ""

    def choice(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self.string(key, default=default, example=f'"{choices[0]}"')
        if value not in choices:
            self.problem(
                key,
                f"{value!r} is not one of {', '.join(choices)}",
                f"set {key} to one of: {', '.join(choices)}",
            )
            return default
        return value

    def number(
        self, key: str, *, default: float, minimum: float, maximum: float | None = None
    ) -> float:
        value = self._get(key, (int, float), "a number", default, False, str(default))
        number = float(value if value is not None else default)
        if number < minimum or (maximum is not None and number > maximum):
            upper = f" and at most {maximum:g}" if maximum is not None else ""
            self.problem(key, f"{number:g} is out of range", f"use at least {minimum:g}{upper}")
            return default
        return number

    def integer(self, key: str, *, default: int | None, minimum: int, maximum: int) -> int:
        value = self._get(key, int, "an integer", default, default is None, str(minimum))
        if value is None:
            return default or 0
        if not minimum <= value <= maximum:
            self.problem(key, f"{value} is out of range", f"use {minimum}..{maximum}")
            return default or minimum
        return value

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self._get(key, bool, "true or false", default, False, "false")
        return bool(value)

    def string_list(
        self, key: str, *, required: bool = True, empty_fix: str = "name at least one file"
    ) -> list[str]:
        value = self._get(key, list, "a list of strings", None, required, '["..."]')
        if value is None:
            return []
        if not all(isinstance(v, str) for v in value):
            self.problem(key, "every entry must be a string", f'write it as `{key} = ["..."]`')
            return []
        if required and not value:
            self.problem(key, "the list is empty", empty_fix)
        return list(value)

    def address_port(
        self, key: str, value: str, fix: str, *, not_an_ip: str = ""
    ) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
        """``value`` as ``ADDRESS:PORT`` (``[IPv6]:PORT``): the address as written, as an
        IP address, and the port 1-65535; None, with a problem naming ``fix``, otherwise.
        ``not_an_ip``: what the problem adds when the address is not an IP address."""
        host, sep, port_text = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            self.problem(key, f"{value!r} is not ADDRESS:PORT with a port 1-65535", fix)
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.problem(key, f"{host!r} is not an IP address{not_an_ip}", fix)
            return None
        return host, address, int(port_text)

    def moved(self, key: str, fix: str) -> None:
        """A key that is no longer read in this table: say where it went."""
        if key in self._table:
            self._seen.add(key)
            self.problem(key, "is no longer read in this table", fix)

    def table(self, key: str, *, required: bool = True) -> Section:
        if required and key not in self._table:
            self._seen.add(key)
            self.problem(
                key, "required table is missing", f"add a [{self._key(key)}] table to the file"
            )
        value = self._get(key, dict, "a table", None, False, f"[{self._key(key)}]")
        return Section(self._reader, self._file, self._key(key), value or {})

    def optional_table(self, key: str) -> Section | None:
        """The table ``key`` when the file has one; None (that feature off) when not."""
        return self.table(key, required=False) if key in self._table else None

    def tables(self, key: str, *, missing: tuple[str, str] | None = None) -> list[Section]:
        if missing is not None and key not in self._table:
            self._seen.add(key)
            self.problem(key, *missing)
            return []
        if key not in self._table:
            self._seen.add(key)
            self.problem(
                key,
                "required table is missing",
                f"add at least one [[{self._key(key)}]] table to the file",
            )
            return []
        value = self._get(key, list, "an array of tables", None, True, f"[[{self._key(key)}]]")
        sections = []
        for index, item in enumerate(value or []):
            if not isinstance(item, dict):
                self.problem(key, "every entry must be a table", f"write [[{self._key(key)}]]")
                continue
            sections.append(Section(self._reader, self._file, f"{self._key(key)}[{index}]", item))
        if value is not None and not value:
            self.problem(key, "no entries", f"add at least one [[{self._key(key)}]]")
        return sections

    def has(self, key: str) -> bool:
        return key in self._table

    def mark_seen(self, key: str) -> None:
        self._seen.add(key)

    def _shown(self, key: str, value: Any) -> str:
        """``key`` as the file writes it: ``[table]``, ``[[tables]]`` or ``key``."""
        if isinstance(value, dict):
            return f"[{self._key(key)}]"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return f"[[{self._key(key)}]]"
        return f"`{key}`"

    def finish(self) -> None:
        """Report every key nobody asked for: a typo must not pass silently.  Listed
        before the file's other problems: a misspelt table or key is usually why a
        required one is reported missing."""
        for key in sorted(set(self._table) - self._seen):
            known = ", ".join(sorted(self._seen)) or "(none)"
            value = self._table[key]
            shown = self._shown(key, value)
            message = "unknown key" if shown == f"`{key}`" else f"unknown key: the table {shown}"
            fix = f"remove it or correct the spelling; known keys: {known}"
            match = difflib.get_close_matches(key, sorted(self._seen), n=1)
            if match:
                meant = self._shown(match[0], value)
                fix = (
                    f"did you mean {meant}? rename it to {meant}, or remove it; known keys: {known}"
                )
            self._reader.add(self._file, self._key(key), message, fix, first=True)


class Reader:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []
        self.read: list[Place] = []  # every file read for a key, for the overlap rules

    def add(
        self,
        file: Path,
        key: str,
        message: str,
        fix: str,
        severity: str = "error",
        *,
        first: bool = False,
    ) -> None:
        """One problem; ``first``: listed before the other problems of its file."""
        problem = ConfigProblem(str(file), key, message, fix, severity)
        at = len(self.problems)
        if first:
            at = next((i for i, p in enumerate(self.problems) if p.file == str(file)), at)
        self.problems.insert(at, problem)

    def in_error(self, file: Path, key: str) -> bool:
        """Whether ``key`` of ``file`` already has an error (its value is not usable)."""
        return any(p.file == str(file) and p.key == key for p in self.errors)

    @property
    def errors(self) -> list[ConfigProblem]:
        return [p for p in self.problems if p.severity == "error"]

    def load_toml(self, path: Path) -> dict[str, Any] | None:
        try:
            return tomllib.loads(read_admin_file(path).decode())
        except FileNotFoundError:
            self.add(path, "", "file not found", "create it or pass the right --config path")
        except PermissionError:
            self.add(path, "", "file is not readable", "make it readable by the medgw user")
        except tomllib.TOMLDecodeError as exc:
            self.add(path, "", f"not valid TOML: {exc}", "correct the syntax at that line")
        except UnicodeDecodeError as exc:
            self.add(
                path,
                "",
                f"not UTF-8 text: byte {exc.start} is 0x{exc.object[exc.start]:02x}",
                "save the file as UTF-8 (TOML files are UTF-8)",
            )
        except OSError as exc:
            self.add(path, "", f"cannot read: {exc.strerror}", "check the path and permissions")
        return None

    def path(self, value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def read_file(
        self, section: Section, key: str, path: Path, what: str = "a file medgw reads"
    ) -> bytes | None:
        file, full_key = section.where(key)
        self.read.append(Place(path, file, full_key, what, tree=False))
        try:
            return read_admin_file(path)
        except FileNotFoundError:
            section.problem(key, f"file {path} not found", "correct the path or create the file")
        except PermissionError:
            section.problem(key, f"file {path} is not readable", "make it readable by medgw")
        except OSError as exc:
            section.problem(key, f"cannot read {path}: {exc.strerror}", "check the path")
        return None

    def certificates(self, section: Section, key: str, path: Path) -> list[x509.Certificate]:
        data = self.read_file(section, key, path, "a certificate file")
        if data is None:
            return []
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            section.problem(
                key,
                f"{path} holds no readable X.509 certificate ({exc})",
                "give a PEM or DER certificate file",
            )
            return []
        return certs

    def check_private_mode(
        self, section: Section, key: str, path: Path, what: str = "private key"
    ) -> None:
        """A secret file only its owner can reach, or a problem naming ``what``."""
        status = path.stat()
        mode = status.st_mode
        if mode & stat.S_IRWXO:
            section.problem(
                key,
                f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                "medgw does not start with a secret anyone but its owner can reach",
                f"chmod 600 {path}",
            )
        elif mode & stat.S_IRWXG:
            # The medgw group is where internal systems are put to reach the API socket.
            section.problem(
                key,
                f"{what} {path} is accessible by its group {_group_name(status.st_gid)} "
                f"(mode {stat.S_IMODE(mode):o}): every member of that group, e.g. an "
                "internal system given access to the API socket, "
                f"{'could read it' if mode & stat.S_IRGRP else 'has access to it'}; medgw "
                "does not start with a secret anyone but its owner can reach",
                f"chmod 600 {path}",
            )

    def private_key(self, section: Section, key: str, path: Path) -> PrivateKey | None:
        data = self.read_file(section, key, path, "a private key of this gateway")
        if data is None:
            return None
        self.check_private_mode(section, key, path)
        try:
            if b"-----BEGIN" in data:
                loaded = serialization.load_pem_private_key(data, password=None)
            else:
                loaded = serialization.load_der_private_key(data, password=None)
        except TypeError:
            section.problem(
                key,
                f"private key {path} is encrypted with a passphrase",
                "store it unencrypted, readable only by the medgw user (chmod 600)",
            )
            return None
        except ValueError as exc:
            section.problem(key, f"{path} holds no readable private key ({exc})", "give a PEM key")
            return None
        if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            section.problem(
                key, f"{path}: {type(loaded).__name__} keys are not supported", "use RSA or ECDSA"
            )
            return None
        return loaded

    def check_key_policy(self, section: Section, key: str, cert: x509.Certificate) -> None:
        try:
            public = certificate_key(cert, "certificate key")
        except PolicyError as exc:
            section.problem(key, exc.message, exc.fix or "use an RSA-3072 or ECDSA P-256 key")
            return
        if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            section.problem(
                key,
                "EdDSA (Ed25519/Ed448) certificates are not accepted: medgw signs and verifies "
                "with ECDSA and RSA, which every AS2 partner's software supports",
                "use an ECDSA P-256 or RSA-3072 key",
            )
            return
        policy = AlgorithmPolicy()
        try:
            policy.check_signature_key(public)
        except PolicyError as exc:
            section.problem(key, exc.message, exc.fix or "use a stronger key")
            return
        for warning in policy.warnings_for_key(public):
            section.problem(key, warning, "plan a move to RSA-3072 or ECDSA", "warning")

    def key_pair(self, section: Section, cert_key: str, key_key: str) -> KeyPair | None:
        cert_path = self.path(section.string(cert_key, example='"certs/tls.crt"'))
        key_path = self.path(section.string(key_key, example='"certs/tls.key"'))
        certs = self.certificates(section, cert_key, cert_path)
        private = self.private_key(section, key_key, key_path)
        if not certs or private is None:
            return None
        leaf = certs[0]
        self.check_key_policy(section, cert_key, leaf)
        if not _same_public_key(leaf, private):
            section.problem(
                key_key,
                f"{key_path} is not the private key of the certificate {cert_path} "
                f"({leaf.subject.rfc4514_string()})",
                f"point {cert_key} and {key_key} at a matching certificate and key",
            )
            return None
        return KeyPair(cert_path, key_path, leaf, private, tuple(certs[1:]))


def _group_name(gid: int) -> str:
    try:
        return repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        return f"gid {gid}"


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt))


def _as_kind(value: object, kind: type | tuple[type, ...]) -> str | None:
    """The admin's own value written as the kind the key wants (``"28443"`` as ``28443``,
    ``8470`` as ``"8470"``), for the fix of a type error; None when it does not convert."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, str):
        text = value.strip()
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower()
        if int in kinds and re.fullmatch(r"[+-]?[0-9][0-9_]*", text):
            return text
        if float in kinds and re.fullmatch(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text):
            return text
        return None
    if str in kinds and isinstance(value, int | float) and not isinstance(value, bool):
        return f'"{value}"'
    return None
