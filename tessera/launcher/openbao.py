"""OpenBao for `tessera up`: real storage on disk, so it can be restarted on its own.

Dev mode (``infra.start_openbao``, used by throwaway test fixtures) keeps everything in
memory: a restarted one has no PKI, no AppRoles and no tool secrets. The local mesh instead
runs ``bao server`` with integrated (raft) storage under ``<data_dir>/openbao/storage``;
the launcher initialises it once (one key share, enough for a single-operator local
mesh) and unseals it at every start. The unseal key and the root token are local-bootstrap material:
they live only in ``<data_dir>/secrets/`` (mode 0600) and never reach a log, argv or a
service's environment. Production runs its own OpenBao or Vault, unsealed by its own
operators or auto-unseal.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tessera.launcher import processes
from tessera.launcher.binaries import find_binary
from tessera.launcher.infra import LOOPBACK, OpenBaoServer, StartFailed
from tessera.runtime.private_files import write_private

__all__ = ["ROOT_TOKEN_FILE", "UNSEAL_KEY_FILE", "start_persistent_openbao", "unseal"]

ROOT_TOKEN_FILE = "root-token"
UNSEAL_KEY_FILE = "openbao-unseal-key"


def _config(storage: Path, port: int) -> str:
    # HCL accepts JSON; json.dumps quotes paths safely.
    return json.dumps(
        {
            # OpenBao keeps raft (integrated storage) and drops the old file backend.
            # performance_multiplier 1: a single node elects itself in about a second,
            # where the default (5) makes `sys/init` take six.
            "storage": {
                "raft": {"path": str(storage), "node_id": "local", "performance_multiplier": 1}
            },
            "listener": [
                {"tcp": {"address": f"{LOOPBACK}:{port}", "tls_disable": True}},
            ],
            "api_addr": f"http://{LOOPBACK}:{port}",
            "cluster_addr": f"https://{LOOPBACK}:{port + 1}",
            "ui": False,
            "log_level": "warn",
        },
        indent=2,
    )


def _request(
    addr: str, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{addr}/v1/{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def _seal_status(server: OpenBaoServer, deadline: float) -> dict[str, Any]:
    """``sys/seal-status`` once the listener answers (it answers sealed or not)."""
    delay = 0.02
    while True:
        if not processes.pid_exists(server.pid):
            raise StartFailed(server.name, "exited during its start", server.log_path)
        try:
            status: dict[str, Any] = _request(server.addr, "GET", "sys/seal-status")
            return status
        except (urllib.error.URLError, OSError, ValueError):
            if time.monotonic() >= deadline:
                raise StartFailed(server.name, "did not listen in time", server.log_path) from None
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def unseal(server: OpenBaoServer, secrets_dir: Path, *, timeout: float = 20.0) -> None:
    """Unseal with the key the launcher stored at initialisation (no-op when unsealed)."""
    deadline = time.monotonic() + timeout
    status = _seal_status(server, deadline)
    if not status.get("sealed", True):
        return
    key_file = secrets_dir / UNSEAL_KEY_FILE
    try:
        key = key_file.read_text().strip()
    except OSError:
        raise StartFailed(
            server.name,
            f"is sealed and its unseal key {key_file} is missing: remove "
            f"{Path(server.log_path).parent.parent / server.name} to start afresh",
            server.log_path,
        ) from None
    result = _request(server.addr, "PUT", "sys/unseal", {"key": key})
    if result.get("sealed", True):
        raise StartFailed(server.name, "stayed sealed with the stored key", server.log_path)


def _initialise(server: OpenBaoServer, secrets_dir: Path) -> str:
    result = _request(server.addr, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    write_private(secrets_dir / UNSEAL_KEY_FILE, result["keys_base64"][0])
    token: str = result["root_token"]
    write_private(secrets_dir / ROOT_TOKEN_FILE, token)
    return token


def start_persistent_openbao(
    data_dir: Path, *, port: int, name: str = "openbao", timeout: float = 20.0
) -> OpenBaoServer:
    """Start (or start again) the mesh's OpenBao, initialised and unsealed, and wait until
    it is active. Its storage survives the process, so `tessera restart openbao` works."""
    home = data_dir / name
    storage = home / "storage"
    storage.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = home / "config.json"
    config.write_text(_config(storage, port))
    argv = [str(find_binary("bao")), "server", f"-config={config}"]
    env = {**os.environ, "HOME": str(home)}  # nothing touches the user's ~/.vault-token
    record = processes.spawn(data_dir, name, argv, env=env)
    secrets_dir = data_dir / "secrets"
    token_file = secrets_dir / ROOT_TOKEN_FILE
    pending = OpenBaoServer(
        name=name,
        addr=f"http://{LOOPBACK}:{port}",
        pid=record.pid,
        log_path=record.log_path,
        root_token_file=str(token_file),
        root_token="",
    )
    deadline = time.monotonic() + timeout
    status = _seal_status(pending, deadline)
    if not status.get("initialized", False):
        token = _initialise(pending, secrets_dir)
    else:
        try:
            token = token_file.read_text().strip()
        except OSError:
            raise StartFailed(
                name,
                f"was initialised before but {token_file} is missing: remove {home} "
                "to start afresh",
                record.log_path,
            ) from None
    server = OpenBaoServer(
        name=name,
        addr=pending.addr,
        pid=pending.pid,
        log_path=pending.log_path,
        root_token_file=str(token_file),
        root_token=token,
    )
    unseal(server, secrets_dir, timeout=max(1.0, deadline - time.monotonic()))
    return server
