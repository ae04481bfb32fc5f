"""Console service settings (env ``TESSERA_CONSOLE_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings

ASSETS = Path(__file__).parent / "assets"


class ConsoleSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_CONSOLE_", extra="ignore", populate_by_name=True
    )

    listen: str = "127.0.0.1:50060"
    instance_id: str = Field(default="console", pattern=r"^[A-Za-z0-9_-]+$")
    """Names this instance's audit chain (keep it stable across restarts)."""
    audit_timeout_s: float = Field(default=2.0, gt=0)
    """How long one audit record may wait for its ack."""
    assets_dir: Path = ASSETS
    """The pages, scripts and styles served under /console/ (read once at start)."""
    issuer_addr: str = ""
    """The OpenBao whose userpass logins and identity tokens people use (empty: the
    mesh's ``TESSERA_VAULT_ADDR``). Must be the issuer the gateway verifies."""
    login_role: str = "human"
    """Identity token role a login is issued by (vault/humans.yaml)."""
    login_timeout_s: float = Field(default=10.0, gt=0, le=60)
    """How long one login may wait for the issuer before it is refused UNAVAILABLE."""
    cookie_name: str = Field(default="tessera_session", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The session cookie; the gateway's jwt_authn reads the token from it."""
    cookie_secure: bool = False
    """Add ``Secure`` to the cookie: set it whenever the front door speaks HTTPS (the
    local front door is plain HTTP on loopback)."""
    failed_logins_per_user: int = Field(default=5, ge=1)
    """Failed logins one user name may have within ``failed_login_window_s`` before
    further attempts are refused for the rest of the window (RESOURCE_EXHAUSTED)."""
    failed_login_window_s: float = Field(default=60.0, gt=0)
    human_subject_claim: str = "preferred_username"
    """Must match the gateway's ``TESSERA_GATEWAY_JWT_SUBJECT_CLAIM``."""
    human_groups_claim: str = "groups"
