"""`python -m services.tool_proxy`: run one tool proxy replica until SIGTERM."""

from services.tool_proxy.app import ToolProxy
from services.tool_proxy.settings import ToolProxySettings
from tessera.runtime.service import run_service

if __name__ == "__main__":
    settings = ToolProxySettings()
    run_service("tool-proxy", settings, lambda: ToolProxy(settings))
