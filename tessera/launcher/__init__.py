"""Embedded local mesh: real nats-server, OpenBao and Envoy from wheels, plus the services.

Modules: ``ports`` (free loopback ports), ``processes`` (PID-file-tracked process groups),
``infra`` (the three servers, shared with the test fixtures), ``gateway`` (Envoy config),
``topology`` (deploy/local/topology.yaml), ``state`` (state.json), ``mesh`` (up/status/down).
"""

from tessera.launcher.ports import PortInUse

__all__ = ["PortInUse"]
