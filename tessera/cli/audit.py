"""`tessera audit tail | verify | export | keys`: read, verify and export the hash-chained,
signed audit stream.

Connection settings come from the environment (``TESSERA_NATS_URL``, ``TESSERA_NAMESPACE``)
or the local mesh. Public keys of the checkpoint signing keys come from ``--keys FILE`` (an
export or a ``tessera audit keys --json`` file), from an export given with ``--from``, or
from Vault: ``--addr`` with ``VAULT_TOKEN``, else the local mesh's OpenBao. With none of
these, ``verify`` checks hashes only and says so (``--require-signatures`` makes that an
error).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from tessera.cli._local import nats_options, nats_url
from tessera.runtime.errors import Unavailable

if TYPE_CHECKING:
    from tessera.audit import AuditEntry, PublicKeys, VerifyReport
    from tessera.v1 import audit_pb2

app = typer.Typer(
    name="audit",
    help="Read, verify and export the hash-chained, signed audit trail.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)

EXIT_TAMPERED = 1
EXIT_UNAVAILABLE = 2
EXIT_NOT_COVERED = 4
"""``verify --receipt``: the record is on its chain, but no signed checkpoint covers it yet."""

KeysFile = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="Public keys to check signatures with (an export, or `audit keys --json`).",
        show_default=False,
        exists=True,
        dir_okay=False,
    ),
]
Addr = Annotated[
    str | None,
    typer.Option(
        "--addr",
        help="Vault/OpenBao address for the public keys; token from VAULT_TOKEN.",
        show_default=False,
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="TESSERA_DATA_DIR",
        help="The local mesh's data directory (default: ./.tessera).",
        show_default=False,
    ),
]


class _NoKeys(Exception):
    """No key source is configured (not an error unless signatures are required)."""


def _quiet_logs() -> None:
    from tessera.runtime.logging import configure_logging

    configure_logging("cli", "warning", stream=sys.stderr)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# -- key sources ---------------------------------------------------------------------------


def _keys_from_file(path: Path) -> PublicKeys:
    from tessera.audit import EXPORT_FORMAT, PublicKeys, load_export

    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if isinstance(header, dict) and header.get("format") == EXPORT_FORMAT:
        return load_export(path).keys
    try:
        return PublicKeys.from_json(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(f"{path}: not an export nor a public keys file ({exc})") from exc


def _vault_target(data_dir: Path | None, addr: str | None) -> tuple[str, str]:
    """(addr, token) of Vault for the public keys; raises :class:`_NoKeys` when no local
    mesh is recorded and no ``--addr`` was given."""
    from tessera.cli.vault import resolve_target
    from tessera.launcher import mesh as launcher
    from tessera.launcher import state as mesh_state

    if not addr:
        directory = (data_dir or launcher.default_data_dir()).resolve()
        recorded = mesh_state.read(directory)
        if recorded is None or not any(c.name == "openbao" for c in recorded.components):
            raise _NoKeys(f"no --keys, no --addr and no local mesh in {directory}")
    target = resolve_target(data_dir, addr, None)
    return target.addr, target.token


async def _keys_from_vault(data_dir: Path | None, addr: str | None) -> PublicKeys:
    from tessera.vault.audit_keys import read_public_keys

    vault_addr, token = _vault_target(data_dir, addr)
    return await read_public_keys(vault_addr, token)


# -- tail ----------------------------------------------------------------------------------


async def _tail(follow: bool, n: int) -> None:
    from tessera.audit import kind_name, tail, to_timestamp_str
    from tessera.runtime.bus import Topology, connect
    from tessera.runtime.config import CommonSettings

    settings = CommonSettings()
    nc = await connect(
        nats_url(settings.nats_url), name="tessera-cli", initial_timeout_s=5.0, **nats_options()
    )
    try:
        async for entry in tail(nc.jetstream(), Topology(settings.namespace), follow=follow, n=n):
            record = entry.record
            if record is None:
                out.print(
                    f"{'?':24} {entry.writer:20} [red]unreadable record[/] "
                    f"(stream seq {entry.stream_sequence})",
                    highlight=False,
                )
                continue
            out.print(
                f"{to_timestamp_str(record.time):24} {entry.writer:20} "
                f"{kind_name(record.kind):20} {record.outcome or '-':18} "
                f"{record.resource or '-':24} {record.workflow_id or '-'}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    finally:
        await nc.close()


@app.command("tail")
def tail_cmd(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    n: Annotated[int, typer.Option("-n", min=0, help="How many past records to show.")] = 20,
) -> None:
    """Print the last records of every chain: time, writer, kind, outcome, resource, workflow."""
    _quiet_logs()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_tail(follow, n))
    except (Unavailable, TimeoutError, OSError) as exc:
        raise _fail(f"audit stream unreachable: {exc}", EXIT_UNAVAILABLE) from None


# -- verify --------------------------------------------------------------------------------


async def _read_live(data_dir: Path | None = None) -> tuple[list[AuditEntry], int]:
    from tessera.audit import read_all
    from tessera.runtime.bus import Topology, connect
    from tessera.runtime.config import CommonSettings

    settings = CommonSettings()
    nc = await connect(
        nats_url(settings.nats_url, data_dir),
        name="tessera-cli",
        initial_timeout_s=5.0,
        **nats_options(data_dir),
    )
    try:
        return await read_all(nc.jetstream(), Topology(settings.namespace))
    finally:
        await nc.close()


def parse_receipt(value: str) -> audit_pb2.AuditReceipt:
    """A receipt as JSON (the protobuf JSON of ``AuditReceipt``, e.g. from a response), as
    ``@FILE`` holding that JSON, or compact as ``<writer>:<sequence>:<hex hash>``."""
    from google.protobuf import json_format

    from tessera.v1 import audit_pb2

    text = value.strip()
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        receipt = audit_pb2.AuditReceipt()
        json_format.Parse(text, receipt, ignore_unknown_fields=False)
        return receipt
    parts = text.split(":", 3)
    if len(parts) < 3 or not parts[1].isdigit():
        raise ValueError("expected JSON, @FILE or <writer>:<sequence>:<hex hash>")
    return audit_pb2.AuditReceipt(
        writer=parts[0],
        sequence=int(parts[1]),
        record_hash=bytes.fromhex(parts[2]),
        decision_id=parts[3] if len(parts) > 3 else "",
    )


def _print_report(report: VerifyReport) -> None:
    table = Table(title="audit chains", title_justify="left")
    for column in ("writer", "records", "carried", "head", "signed through", "status"):
        table.add_column(column)
    for chain in report.chains:
        status = "[green]intact[/]" if chain.ok else f"[red]{len(chain.issues)} issue(s)[/]"
        signed = str(chain.covered_sequence) if chain.signatures_checked else "-"
        table.add_row(
            chain.writer,
            str(chain.records),
            str(chain.carried),
            str(chain.head_sequence),
            signed,
            status,
        )
    out.print(table)
    for chain in report.chains:
        if chain.signatures_checked and chain.uncovered:
            out.print(
                f"not yet covered: chain {chain.writer}, {chain.uncovered} record(s) after "
                f"sequence {chain.covered_sequence} (no signed checkpoint yet; not a failure)",
                highlight=False,
            )


@app.command("verify")
def verify_cmd(
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Verify an export file offline (no NATS, no Vault) instead of the stream.",
            show_default=False,
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    receipt: Annotated[
        str | None,
        typer.Option(
            "--receipt",
            help="Check one receipt (JSON, @FILE or writer:sequence:hexhash).",
            show_default=False,
        ),
    ] = None,
    keys_file: KeysFile = None,
    addr: Addr = None,
    data_dir: DataDir = None,
    hash_only: Annotated[
        bool, typer.Option("--hash-only", help="Check hashes and links, not signatures.")
    ] = False,
    require_signatures: Annotated[
        bool,
        typer.Option("--require-signatures", help="Fail when no public keys can be had."),
    ] = False,
) -> None:
    """Verify every hash chain and checkpoint signature. Exit 0 when intact; 1 with a
    report of each modified, missing, reordered, duplicated, unlinked, deleted or forged
    record; 2 when unreachable. Records after a chain's last signed checkpoint are listed
    as not yet covered (not a failure). With --receipt: 0 when the record is on its chain
    and covered by a signed checkpoint, 4 when not yet covered, 1 when it does not check."""
    from tessera.audit import check_receipt, load_export, verify_entries
    from tessera.vault.errors import VaultError

    _quiet_logs()
    parsed = None
    if receipt is not None:
        try:
            parsed = parse_receipt(receipt)
        except (ValueError, OSError) as exc:
            raise _fail(f"invalid receipt: {exc}", 2) from None
    keys = None
    try:
        if source is not None:
            export = load_export(source)
            stored, last = list(export.entries), export.last_stream_sequence
            keys = export.keys
        else:
            stored, last = asyncio.run(_read_live(data_dir))
        if keys_file is not None:
            keys = _keys_from_file(keys_file)
        elif not hash_only and (source is None or addr):
            keys = asyncio.run(_keys_from_vault(data_dir, addr))
    except _NoKeys as exc:
        if require_signatures:
            raise _fail(f"no public keys to check signatures with: {exc}", 2) from None
        err.print(f"[yellow]warning:[/] signatures NOT checked: {exc}", highlight=False)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except (Unavailable, VaultError, TimeoutError, OSError) as exc:
        raise _fail(f"audit trail unreachable: {exc}", EXIT_UNAVAILABLE) from None
    if hash_only:
        keys = None
    report = verify_entries(stored, last_stream_sequence=last, keys=keys)
    _print_report(report)
    if parsed is not None:
        found = check_receipt(report, stored, parsed)
        if found.status == "covered":
            out.print(f"[green]RECEIPT OK[/]: {found.detail}", highlight=False)
            return
        if found.status == "not_yet_covered":
            out.print(f"[yellow]RECEIPT NOT YET COVERED[/]: {found.detail}", highlight=False)
            raise typer.Exit(EXIT_NOT_COVERED)
        raise _fail(f"receipt does not verify: {found.detail}", EXIT_TAMPERED)
    if report.ok:
        signed = (
            "signatures checked"
            if keys is not None
            else "[yellow]hashes only, signatures not checked[/]"
        )
        out.print(
            f"[green]OK[/]: {report.records} records (carrying {report.carried} more) in "
            f"{len(report.chains)} chain(s) verify ({signed})"
        )
        _print_approvals(stored)
        return
    issues = Table(title="integrity issues", title_justify="left")
    for column in ("kind", "writer", "chain seq", "stream seq", "detail"):
        issues.add_column(column)
    for issue in report.issues:
        issues.add_row(
            f"[red]{issue.kind}[/]",
            issue.writer or "-",
            str(issue.sequence or "-"),
            str(issue.stream_sequence or "-"),
            issue.detail,
        )
    out.print(issues)
    raise _fail(f"{len(report.issues)} integrity issue(s) found", EXIT_TAMPERED)


def _print_approvals(stored: list[AuditEntry]) -> None:
    """Who decided which gate, from the records that just verified (the names are the
    people the front door authenticated)."""
    from tessera.v1 import audit_pb2

    rows = []
    for entry in stored:
        if entry.record is None:
            continue
        # A record written in another's ``carried`` field (group commit) counts the same.
        for record in (*entry.record.carried, entry.record):
            if record.kind != audit_pb2.AUDIT_KIND_APPROVAL:
                continue
            details = dict(record.details)
            who = details.get("decided_by") or details.get("approved_by") or "?"
            rows.append((record.resource, record.outcome, str(who)))
    if not rows:
        return
    table = Table(title="gate decisions (verified records)", title_justify="left")
    for column in ("gate", "decision", "by"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


# -- export and keys -----------------------------------------------------------------------


@app.command("export")
def export_cmd(
    file: Annotated[Path, typer.Argument(help="Where to write the export (JSON Lines).")],
    keys_file: KeysFile = None,
    addr: Addr = None,
    data_dir: DataDir = None,
) -> None:
    """Write every stored record and the public keys of every signing key version to FILE,
    so that `tessera audit verify --from FILE` works with no NATS and no Vault."""
    from tessera.audit import write_export
    from tessera.runtime.bus import Topology
    from tessera.runtime.config import CommonSettings
    from tessera.vault.errors import VaultError

    _quiet_logs()
    settings = CommonSettings()
    topology = Topology(settings.namespace)
    try:
        if keys_file is not None:
            keys = _keys_from_file(keys_file)
        else:
            keys = asyncio.run(_keys_from_vault(data_dir, addr))
        stored, last = asyncio.run(_read_live(data_dir))
        written = write_export(
            file,
            stored,
            namespace=settings.namespace,
            stream=topology.audit_stream,
            last_stream_sequence=last,
            keys=keys,
        )
    except _NoKeys as exc:
        raise _fail(f"an export needs the public keys: {exc}", 2) from None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except (Unavailable, VaultError, TimeoutError, OSError) as exc:
        raise _fail(f"audit trail unreachable: {exc}", EXIT_UNAVAILABLE) from None
    versions = sum(len(v) for v in keys.keys.values())
    out.print(
        f"exported {written} records and {versions} public key version(s) of "
        f"{len(keys.keys)} key(s) to {file}",
        highlight=False,
    )


@app.command("keys")
def keys_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the keys as JSON.")] = False,
    addr: Addr = None,
    data_dir: DataDir = None,
) -> None:
    """Print the public keys of the audit signing keys (every version) with their SHA-256
    fingerprints, to compare with an export's or to pin with --keys."""
    from tessera.vault.errors import VaultError

    _quiet_logs()
    try:
        keys = asyncio.run(_keys_from_vault(data_dir, addr))
    except _NoKeys as exc:
        raise _fail(str(exc), 2) from None
    except (VaultError, TimeoutError, OSError) as exc:
        raise _fail(f"vault unreachable: {exc}", EXIT_UNAVAILABLE) from None
    if as_json:
        out.print_json(json.dumps(keys.to_json()))
        return
    for name, versions in sorted(keys.keys.items()):
        for version, public in sorted(versions.items()):
            fingerprint = hashlib.sha256(public).hexdigest()
            out.print(f"{name} v{version} {keys.algorithms.get(name, '?')} {fingerprint}")
