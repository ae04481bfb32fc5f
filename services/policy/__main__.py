"""`python -m services.policy`: run one policy service instance until SIGTERM."""

from services.policy.app import PolicyService
from services.policy.settings import PolicySettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = PolicySettings()
    run_service("policy", settings, lambda: PolicyService(settings))
