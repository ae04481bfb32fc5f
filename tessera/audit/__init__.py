"""Hash-chained, signed audit records on JetStream: write, verify, tail, export.

One chain per writer, one job per module:

* :mod:`~tessera.audit.scrub`: what a record may say (:func:`scrub`, :func:`hmac_digest`);
* :mod:`~tessera.audit.records`: hashing and receipts (:func:`record_hash`);
* :mod:`~tessera.audit.writer`: :class:`AuditWriter`, appending and checkpointing;
* :mod:`~tessera.audit.signing`: checkpoint payloads, key ownership, :class:`PublicKeys`;
* :mod:`~tessera.audit.reader`: :func:`tail` and reading entries back;
* :mod:`~tessera.audit.verify`: :func:`verify` (hashes, links, gaps, signatures) and
  :func:`check_receipt`;
* :mod:`~tessera.audit.export`: a file that verifies with no NATS and no Vault.

The Vault side (Transit keys, the signer, the HMAC key) is :mod:`tessera.vault.audit_keys`.

Limits: a chain proves integrity up to its last signed checkpoint against anyone who does
not hold the writer's Transit key; records after it are *not yet covered* (someone with
write access to the stream could re-hash them) until the next checkpoint, at most
``checkpoint_every`` records (or, on a busy chain, ``checkpoint_min_interval_s``) or
``checkpoint_interval_s`` later.
"""

from tessera.audit.export import EXPORT_FORMAT, Export, load_export, write_export
from tessera.audit.reader import AuditEntry, tail
from tessera.audit.records import (
    kind_name,
    receipt_for,
    record_hash,
    to_timestamp_str,
)
from tessera.audit.scrub import HMAC_PREFIX, hmac_digest, is_sensitive_key, scrub
from tessera.audit.signing import (
    PublicKeys,
    Signature,
    Signer,
    checkpoint_payload,
    key_name_for,
    key_owns_chain,
)
from tessera.audit.verify import (
    ChainReport,
    Issue,
    IssueKind,
    ReceiptReport,
    VerifyReport,
    check_receipt,
    read_all,
    verify,
    verify_entries,
)
from tessera.audit.writer import AuditWriter

__all__ = [
    "EXPORT_FORMAT",
    "HMAC_PREFIX",
    "AuditEntry",
    "AuditWriter",
    "ChainReport",
    "Export",
    "Issue",
    "IssueKind",
    "PublicKeys",
    "ReceiptReport",
    "Signature",
    "Signer",
    "VerifyReport",
    "check_receipt",
    "checkpoint_payload",
    "hmac_digest",
    "is_sensitive_key",
    "key_name_for",
    "key_owns_chain",
    "kind_name",
    "load_export",
    "read_all",
    "receipt_for",
    "record_hash",
    "scrub",
    "tail",
    "to_timestamp_str",
    "verify",
    "verify_entries",
    "write_export",
]
