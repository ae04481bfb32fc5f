"""`python -m services.registry`: run one registry service instance until SIGTERM."""

from services.registry.app import RegistryApp
from services.registry.settings import RegistrySettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = RegistrySettings()
    run_service("registry", settings, lambda: RegistryApp(settings))
