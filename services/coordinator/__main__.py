"""`python -m services.coordinator`: run one coordinator replica until SIGTERM."""

from services.coordinator.app import Coordinator
from services.coordinator.settings import CoordinatorSettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = CoordinatorSettings()
    run_service("coordinator", settings, lambda: Coordinator(settings))
