"""The audit reader: one workflow's audit trail, verified, for people (AuditService)."""
