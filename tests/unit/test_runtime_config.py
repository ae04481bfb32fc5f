"""Settings: fixed names for shared infrastructure, the service prefix for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import MIB, CommonSettings, ServiceSettings


class PlannerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_PLANNER_")

    coordinator_address: str = "127.0.0.1:50051"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TESSERA_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = PlannerSettings()
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.namespace == "tessera"
    assert s.vault_addr == "http://127.0.0.1:8200"
    assert s.vault_approle_file is None
    assert s.log_level == "info"
    assert s.otel_exporter == "none"
    assert s.otel_endpoint is None
    assert s.listen == "127.0.0.1:0"
    assert s.max_message_bytes == 4 * MIB
    assert (s.default_deadline_s, s.max_deadline_s, s.shutdown_grace_s) == (10.0, 300.0, 5.0)


def test_common_fields_read_fixed_names_whatever_the_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TESSERA_NATS_URL", "nats://nats-0:4222")
    monkeypatch.setenv("TESSERA_NAMESPACE", "t_123")
    monkeypatch.setenv("TESSERA_VAULT_ADDR", "http://bao:8200")
    monkeypatch.setenv("TESSERA_VAULT_APPROLE_FILE", "/run/secrets/approle.json")
    monkeypatch.setenv("TESSERA_LOG_LEVEL", "debug")
    monkeypatch.setenv("TESSERA_OTEL_EXPORTER", "otlp")
    monkeypatch.setenv("TESSERA_OTEL_ENDPOINT", "http://collector:4317")
    # Prefixed spellings of common fields are NOT read.
    monkeypatch.setenv("TESSERA_PLANNER_NATS_URL", "nats://wrong:4222")
    for s in (PlannerSettings(), CommonSettings(), ServiceSettings()):
        assert s.nats_url == "nats://nats-0:4222"
        assert s.namespace == "t_123"
        assert s.vault_addr == "http://bao:8200"
        assert s.vault_approle_file == Path("/run/secrets/approle.json")
        assert s.log_level == "debug"
        assert s.otel_exporter == "otlp"
        assert s.otel_endpoint == "http://collector:4317"


def test_service_fields_follow_the_subclass_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_PLANNER_LISTEN", "0.0.0.0:7001")
    monkeypatch.setenv("TESSERA_PLANNER_MAX_MESSAGE_BYTES", "1024")
    monkeypatch.setenv("TESSERA_PLANNER_DEFAULT_DEADLINE_S", "2.5")
    monkeypatch.setenv("TESSERA_PLANNER_COORDINATOR_ADDRESS", "coord:50051")
    monkeypatch.setenv("TESSERA_LISTEN", "0.0.0.0:9999")  # another service's setting
    s = PlannerSettings()
    assert s.listen == "0.0.0.0:7001"
    assert s.max_message_bytes == 1024
    assert s.default_deadline_s == 2.5
    assert s.coordinator_address == "coord:50051"


def test_init_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("TESSERA_PLANNER_LISTEN", "0.0.0.0:7001")
    s = PlannerSettings(nats_url="nats://from-code:4222", listen="127.0.0.1:0")
    assert s.nats_url == "nats://from-code:4222"
    assert s.listen == "127.0.0.1:0"


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_OTEL_EXPORTER", "jaeger")
    with pytest.raises(ValidationError):
        CommonSettings()
    monkeypatch.delenv("TESSERA_OTEL_EXPORTER")
    monkeypatch.setenv("TESSERA_PLANNER_MAX_DEADLINE_S", "-1")
    with pytest.raises(ValidationError):
        PlannerSettings()
