"""The console service's own rules: which files it answers, how a session cookie is
made, how password guessing is bounded; and the front door leaving out a transcoded
service its contracts do not hold."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from services.console.assets import Assets
from services.console.sessions import FailedLogins, clear_cookie, session_cookie
from tessera.launcher.gateway import build_resources
from tessera.v1 import coordinator_pb2


def test_only_files_of_the_assets_folder_are_answered(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    (root / "js").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html>")
    (root / "js" / "app.js").write_text("export {}")
    (root / "notes.txt").write_text("not a page")
    (tmp_path / "secret.html").write_text("outside")
    (root / "link.html").symlink_to(tmp_path / "secret.html")
    assets = Assets.load(root)
    index = assets.get("")
    assert index is not None and index.content_type.startswith("text/html")
    app = assets.get("js/app.js")
    assert app is not None and app.content_type.startswith("text/javascript")
    for path in ("../secret.html", "link.html", "notes.txt", "/etc/passwd", "js/../../secret.html"):
        assert assets.get(path) is None, path


def test_a_session_cookie_is_out_of_scripts_reach_and_lasts_as_long_as_its_token() -> None:
    import time

    cookie = session_cookie("tessera_session", "a.b.c", expire_time=time.time() + 600, secure=False)
    parts = cookie.split("; ")
    assert parts[0] == "tessera_session=a.b.c"
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts)
    max_age = int(next(p for p in parts if p.startswith("Max-Age=")).split("=")[1])
    assert 590 <= max_age <= 600
    assert "Secure" in session_cookie("s", "t", expire_time=0, secure=True).split("; ")
    cleared = clear_cookie("tessera_session", secure=False)
    assert cleared.startswith("tessera_session=;") and "Max-Age=0" in cleared


def test_failed_logins_block_a_user_name_for_the_rest_of_the_window() -> None:
    limiter = FailedLogins(limit=3, window_s=60)
    for t in (0.0, 1.0, 2.0):
        assert limiter.blocked("finance", now=t) == 0
        limiter.failed("finance", now=t)
    assert limiter.blocked("finance", now=3.0) == 57.0  # until the first failure ages out
    assert limiter.blocked("compliance", now=3.0) == 0  # per user name
    assert limiter.blocked("finance", now=60.5) == 0
    limiter.failed("finance", now=61)
    limiter.succeeded("finance")
    assert limiter.blocked("finance", now=62) == 0


def test_guessed_names_cannot_grow_the_failure_table_without_bound() -> None:
    limiter = FailedLogins(limit=3, window_s=60, max_names=10)
    for i in range(100):
        limiter.failed(f"user-{i}", now=float(i) / 100)
    assert len(limiter._failures) == 10


def test_a_transcoded_service_the_contracts_lack_is_left_out_not_fatal(tmp_path: Path) -> None:
    descriptors = descriptor_pb2.FileDescriptorSet()
    coordinator_pb2.DESCRIPTOR.CopyToProto(descriptors.file.add())
    path = tmp_path / "set.binpb"
    path.write_bytes(descriptors.SerializeToString())
    edge = {"transcoder": {"services": ["tessera.v1.CoordinatorService", "tessera.v1.Newer"]}}
    resources = build_resources(
        edge, listen="127.0.0.1:1", access_log="/dev/null", upstreams=[], descriptor_set=path
    )
    hcm = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoder = next(
        f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    )
    assert transcoder["typed_config"]["services"] == ["tessera.v1.CoordinatorService"]


def test_an_approver_sees_what_they_approve_and_no_secret() -> None:
    from services.tool_proxy.recording import approver_arguments
    from services.tool_proxy.tools import SideEffect, Tool, ToolSpec

    async def handler(*_: object) -> dict[str, object]:
        return {}

    spec = ToolSpec(
        name="billing.issue_refund",
        description="refund",
        input_schema={"type": "object"},
        side_effect=SideEffect.EXTERNAL_ACTION,
        category="billing",
        secret_fields=frozenset({"iban_holder"}),
    )
    shown = approver_arguments(
        {
            "amount": 1500,
            "customer_id": "C-1",
            "card_number": "4111111111111111",  # credential-like name
            "iban_holder": "Ann Example",  # the tool's declared secret field
            "note": {"api_key": "k-123", "text": "duplicate"},  # nested
            "memo": "Bearer abc.def.ghi",  # token-like value
            "long": "x" * 2000,
        },
        Tool(spec, handler),  # type: ignore[arg-type]
    )
    assert shown["amount"] == 1500 and shown["customer_id"] == "C-1"
    assert shown["card_number"] == shown["iban_holder"] == "[redacted]"
    assert shown["note"] == {"api_key": "[redacted]", "text": "duplicate"}
    assert shown["memo"] == "[redacted]"
    assert len(shown["long"]) < 600
