"""One workflow's records out of the verified stream, each with its chain's verdict.

Pure functions over what :func:`tessera.audit.verify.read_all` read and
:func:`~tessera.audit.verify.verify_entries` reported, so the verdicts are the ones
``tessera audit verify --receipt`` gives.
"""

from __future__ import annotations

from collections.abc import Iterable

from tessera.audit import AuditEntry, receipt_for
from tessera.audit.verify import VerifyReport, check_receipt
from tessera.v1 import audit_pb2

__all__ = ["STARTED", "verified_records", "workflow_attributes"]

COORDINATOR = "coordinator"
STARTED = "started"
"""Outcome of the coordinator's record of a workflow's start (its attributes)."""
RV = audit_pb2.RecordVerification
_VERDICTS = {
    "covered": RV.RECORD_VERIFICATION_VERIFIED,
    "not_yet_covered": RV.RECORD_VERIFICATION_NOT_YET_COVERED,
    "failed": RV.RECORD_VERIFICATION_FAILED,
}


def verified_records(
    stored: Iterable[AuditEntry], report: VerifyReport, workflow_id: str
) -> list[audit_pb2.VerifiedAuditRecord]:
    """Every record naming ``workflow_id``, carried ones on their own, oldest first."""
    out: list[tuple[float, int, audit_pb2.VerifiedAuditRecord]] = []
    for entry in stored:
        record = entry.record
        if record is None:
            continue
        carried = [c for c in record.carried if c.workflow_id == workflow_id]
        if record.workflow_id != workflow_id and not carried:
            continue
        receipt = receipt_for(entry.writer, record)
        verdict = check_receipt(report, [entry], receipt)
        listed = [record] if record.workflow_id == workflow_id else []
        for item in (*listed, *carried):
            shown = audit_pb2.AuditRecord()
            shown.CopyFrom(item)
            shown.ClearField("carried")
            view = audit_pb2.VerifiedAuditRecord(
                record=shown,
                writer=entry.writer,
                verification=_VERDICTS[verdict.status],
                detail=verdict.detail,
                receipt=receipt,
                owner=entry.owner,
            )
            out.append((item.time.ToMicroseconds() / 1e6, entry.stream_sequence, view))
    out.sort(key=lambda x: (x[0], x[1]))
    return [view for _, _, view in out]


def workflow_attributes(records: Iterable[audit_pb2.VerifiedAuditRecord]) -> dict[str, str] | None:
    """The workflow's ``read_workflow`` attributes, from the coordinator's verified record
    of its start (None: no such record, so nobody may be shown the trail)."""
    for view in records:
        record = view.record
        if (
            record.kind == audit_pb2.AUDIT_KIND_WORKFLOW_TRANSITION
            and record.outcome == STARTED
            and view.owner == COORDINATOR  # no other identity may write its chains
            and view.verification != RV.RECORD_VERIFICATION_FAILED
        ):
            details = record.details
            return {
                "template": str(details["template"]) if "template" in details else "",
                "started_by": str(details["started_by"]) if "started_by" in details else "",
            }
    return None
