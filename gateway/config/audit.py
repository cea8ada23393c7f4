"""``[audit]``: the key that signs audit checkpoints; ``[audit.export]`` is read by
gateway.audit.export.settings."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit.export.settings import ExportSettings, load_export
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


def load_audit(
    reader: Reader, root: Section, data: dict[str, Any], storage: Storage
) -> tuple[SealSettings | None, ExportSettings | None]:
    """The optional ``[audit]`` table: checkpoints (any key but ``export``) and
    ``[audit.export]``, each off when absent."""
    audit, audit_export = None, None
    if "audit" in data:
        audit_section = root.table("audit")
        if audit_section.has("export"):
            audit_export = load_export(reader, audit_section.table("export"))
        if isinstance(data["audit"], dict) and set(data["audit"]) - {"export"}:
            audit = _load_checkpoints(reader, audit_section, storage)
        else:
            audit_section.finish()  # [audit.export] alone: no checkpoints
    return audit, audit_export
