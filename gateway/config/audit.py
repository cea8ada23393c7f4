"""``[audit]``: the key that signs audit checkpoints and when the trail is rotated;
``[audit.export]`` is read by gateway.audit.export.settings."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit.export.settings import ExportSettings, load_export
from gateway.audit.rotation import DEFAULT_MIB, MIB, MIN_MIB, RotationSettings
from gateway.audit.seal import CURVES, SealSettings
from gateway.config.storage import Storage
from gateway.tomlreader import Reader, Section


def _load_checkpoints(reader: Reader, section: Section, storage: Storage) -> SealSettings | None:
    """``[audit]``: the key that signs checkpoints, kept out of the folders it protects."""
    pair = reader.key_pair(section, "certificate", "signing_key")
    every_records = section.integer(
        "checkpoint_every_records", default=1000, minimum=1, maximum=1_000_000
    )
    every_seconds = section.number(
        "checkpoint_every_seconds", default=300, minimum=1, maximum=86_400
    )
    section.finish()
    if pair is None:
        return None
    key = pair.key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        section.problem(
            "signing_key",
            f"{pair.key_path}: audit checkpoints are signed with ECDSA P-256 or P-384 (CRYPTREC)",
            "make one: openssl ecparam -name prime256v1 -genkey -noout -out audit.key",
        )
        return None
    where = pair.key_path.resolve()
    for folder, name in (
        (storage.state_dir, "[storage] state_dir"),
        (storage.audit_log.parent, "the audit log's folder"),
    ):
        if where.is_relative_to(folder.resolve()):
            section.problem(
                "signing_key",
                f"{pair.key_path} is inside {name} ({folder}): whoever can rewrite the "
                "audit trail could also sign it",
                "keep the audit key elsewhere, e.g. /etc/medgw/audit/audit.key, readable "
                "only by the medgw user",
            )
            return None
    return SealSettings(key, pair.certificate, every_records, every_seconds)


ROTATION_KEYS = ("rotate_mib", "rotate_daily")


def _load_rotation(section: Section) -> RotationSettings:
    """``rotate_mib`` (0: not by size) and ``rotate_daily``."""
    mib = section.number("rotate_mib", default=DEFAULT_MIB, minimum=0, maximum=1 << 20)
    if 0 < mib < MIN_MIB:
        section.problem(
            "rotate_mib",
            f"{mib:g} MiB is too small: a file would be closed every few records",
            f"give at least {MIN_MIB:g} (MiB), or 0 not to rotate by size",
        )
    daily = section.boolean("rotate_daily", default=RotationSettings.daily)
    return RotationSettings(int(mib * MIB) if mib else None, daily)


def load_audit(
    reader: Reader, root: Section, data: dict[str, Any], storage: Storage
) -> tuple[SealSettings | None, ExportSettings | None, RotationSettings]:
    """The optional ``[audit]`` table: checkpoints (any key but ``export`` and the rotation
    keys), ``[audit.export]``, each off when absent, and rotation."""
    audit, audit_export, rotation = None, None, RotationSettings()
    if "audit" in data:
        audit_section = root.table("audit")
        if audit_section.has("export"):
            audit_export = load_export(reader, audit_section.table("export"))
        rotation = _load_rotation(audit_section)
        if isinstance(data["audit"], dict) and set(data["audit"]) - {"export", *ROTATION_KEYS}:
            audit = _load_checkpoints(reader, audit_section, storage)
        else:
            audit_section.finish()  # [audit.export] or rotation alone: no checkpoints
    return audit, audit_export, rotation
