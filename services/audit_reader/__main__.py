"""`python -m services.audit_reader`: run one audit reader instance until SIGTERM."""

from services.audit_reader.app import AuditReaderApp
from services.audit_reader.settings import AuditReaderSettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = AuditReaderSettings()
    run_service("audit-reader", settings, lambda: AuditReaderApp(settings))
