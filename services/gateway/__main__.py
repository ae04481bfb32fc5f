"""`python -m services.gateway`: run the gateway control plane until SIGTERM."""

from services.gateway.app import GatewayControlPlane
from services.gateway.settings import GatewaySettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = GatewaySettings()
    run_service("gateway", settings, lambda: GatewayControlPlane(settings))
