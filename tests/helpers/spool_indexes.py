"""Indexes a spool of an earlier version has, in the forms that version built them."""

from __future__ import annotations

# Retention's indexes of hand-overs and received messages as first built: the time alone
# (SQLite, without statistics, read every row done instead), the records' of every row
# done or answered.  The first start after the upgrade replaces them.
RETENTION_FIRST_FORMS = {
    "handover_copy_kept": "CREATE INDEX handover_copy_kept ON handover (updated_at)"
    " WHERE state='done' AND copy_purged_at IS NULL",
    "handover_done": "CREATE INDEX handover_done ON handover (updated_at) WHERE state='done'",
    "inbound_receipt_kept": "CREATE INDEX inbound_receipt_kept ON inbound (updated_at)"
    " WHERE state='delivered' AND receipt_body IS NOT NULL",
    "inbound_delivered": "CREATE INDEX inbound_delivered ON inbound (updated_at)"
    " WHERE state='delivered'",
}
