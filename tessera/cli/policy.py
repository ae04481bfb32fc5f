"""`tessera policy test` (offline, no server) and `tessera policy reload`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import AliasChoices, Field
from rich.console import Console
from rich.table import Table

from tessera.cli._local import service_address, service_channel
from tessera.runtime.config import CommonSettings

app = typer.Typer(
    name="policy",
    help="Test and reload the Cedar policies (policy-as-code).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)


class _PolicyClientSettings(CommonSettings):
    address: str = Field(
        default="127.0.0.1:50054", validation_alias=AliasChoices("TESSERA_POLICY_ADDRESS")
    )


def _quiet_logs() -> None:
    from tessera.runtime.logging import configure_logging

    configure_logging("cli", "warning", stream=sys.stderr)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command("test")
def test_cmd(
    directory: Annotated[
        Path, typer.Option("--dir", help="Policy directory (schema, policies/, tests/).")
    ] = Path("policy"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show passing cases.")] = False,
) -> None:
    """Run policy/tests/*.yaml against the policies offline and report coverage. Exit 0
    if every case passes and every policy decided at least one case, 1 on any mismatch
    or uncovered policy, 2 if the policies or cases cannot be loaded."""
    # The evaluator is the policy service's own, so tests exercise exactly what serves.
    from tessera.policy.cases import CaseError, load_cases, run_cases
    from tessera.policy.coverage import coverage, uncovered
    from tessera.policy.engine import PolicyLoadError, load_policy_dir

    _quiet_logs()
    try:
        ps = load_policy_dir(directory)
        cases = load_cases(directory / "tests")
    except PolicyLoadError as exc:
        for subject, detail in exc.errors:
            err.print(f"[red]{subject}[/]: {detail}", highlight=False, soft_wrap=True)
        raise _fail("policy set is invalid", 2) from None
    except CaseError as exc:
        raise _fail(str(exc), 2) from None
    results = run_cases(ps, cases)
    failed = [r for r in results if not r.passed]
    table = Table(title=f"policy tests ({ps.version})", title_justify="left")
    for column in ("file", "case", "expected", "got", "policies", "result"):
        table.add_column(column)
    for r in results:
        if r.passed and not verbose:
            continue
        table.add_row(
            r.case.file,
            r.case.name,
            r.case.expect,
            r.decision,
            ", ".join(r.policies) or "-",
            "[green]pass[/]" if r.passed else "[red]FAIL[/]: " + "; ".join(r.problems),
        )
    if table.rows:
        out.print(table)
    report = coverage(ps, results)
    missing = uncovered(report)
    cover = Table(title="policy coverage", title_justify="left")
    for column in ("policy", "effect", "file", "decided", "matched", "status"):
        cover.add_column(column, overflow="fold")
    for c in report:
        cover.add_row(
            c.id,
            c.effect,
            c.file,
            str(len(c.determined)),
            str(len(c.matched)),
            "[green]covered[/]" if c.covered else f"[red]{c.status.upper()}[/]",
        )
    out.print(cover)
    summary = (
        f"{len(results) - len(failed)}/{len(results)} cases pass, "
        f"{len(report) - len(missing)}/{len(report)} policies covered"
    )
    problems = []
    if failed:
        problems.append(f"{len(failed)} case(s) fail")
    if missing:
        names = ", ".join(f"{c.id} ({c.status})" for c in missing)
        problems.append(f"no case shows these policies deciding: {names}")
    if problems:
        raise _fail(f"{summary}; " + "; ".join(problems))
    out.print(f"[green]OK[/]: {summary}")


async def _reload(address: str) -> object:
    from tessera.v1 import policy_pb2, policy_pb2_grpc

    async with service_channel(address, "policy") as chan:
        stub = policy_pb2_grpc.PolicyServiceStub(chan)
        return await stub.ReloadPolicies(policy_pb2.ReloadPoliciesRequest(), timeout=10)


@app.command("reload")
def reload_cmd() -> None:
    """Ask the policy service (TESSERA_POLICY_ADDRESS) to reload its files now. A refused
    set is reported with its errors (exit 1) and the previous set keeps serving."""
    import grpc

    from tessera.runtime.errors import error_details
    from tessera.v1 import policy_pb2

    _quiet_logs()
    address = service_address("policy", "TESSERA_POLICY_ADDRESS", _PolicyClientSettings().address)
    try:
        response = asyncio.run(_reload(address))
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        for _type, subject, description in details.precondition_violations:
            err.print(f"[red]{subject}[/]: {description}", highlight=False, soft_wrap=True)
        code = 1 if details.code == grpc.StatusCode.FAILED_PRECONDITION else 2
        head = (
            details.message.split(": ", 1)[0]
            if details.precondition_violations
            else details.message
        )
        raise _fail(f"{details.code.name}: {head}", code) from None
    assert isinstance(response, policy_pb2.ReloadPoliciesResponse)
    info = response.policy_set
    out.print(f"[green]serving[/] {info.version}: {', '.join(info.policy_ids)}", highlight=False)
