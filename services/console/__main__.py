"""`python -m services.console`: run one console service instance until SIGTERM."""

from services.console.app import ConsoleApp
from services.console.settings import ConsoleSettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = ConsoleSettings()
    run_service("console", settings, lambda: ConsoleApp(settings))
