"""The descriptor set Envoy's gRPC-JSON transcoder reads: every contract in ``proto/``
built by buf, plus the contracts we serve but do not own (A2A's, from the pinned a2a-sdk
package), and which of the transcoded services it really holds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from tessera.launcher.binaries import find_binary

__all__ = ["DescriptorBuildFailed", "build_descriptor_set", "described_services"]

log = structlog.get_logger(__name__)


class DescriptorBuildFailed(RuntimeError):
    """``buf build`` could not produce the descriptor set the transcoder needs."""


def build_descriptor_set(project: Path, output: Path, *, timeout: float = 60.0) -> Path:
    """``buf build`` every contract, with its imports, into a FileDescriptorSet at ``output``
    (what the gRPC-JSON transcoder reads). Runs from ``project`` (where buf.yaml lives),
    linking the googleapis protos into ``.build/protodeps`` first if needed."""
    deps = project / ".build" / "protodeps"
    output.parent.mkdir(parents=True, exist_ok=True)
    commands = []
    if not (deps / "google" / "api").exists():
        commands.append([sys.executable, str(project / "tools" / "proto_deps.py"), str(deps)])
    commands.append(
        [
            str(find_binary("buf")),
            "build",
            "-o",
            str(output),
            "--as-file-descriptor-set",
            "--exclude-source-info",
        ]
    )
    for argv in commands:
        result = subprocess.run(
            argv, cwd=project, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise DescriptorBuildFailed(
                f"{Path(argv[0]).name} failed ({result.returncode}): {result.stderr.strip()}"
            )
    _add_package_contracts(output)
    return output


def _add_package_contracts(output: Path) -> None:
    """Add the contracts we serve but do not own (A2A's ``a2a.proto``, from the a2a-sdk
    package as installed: never copied into proto/) with the files they import, so the
    transcoder also speaks A2A's HTTP+JSON binding."""
    from a2a.types import a2a_pb2  # the pinned package is the contract

    fds = descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes())
    present = {f.name for f in fds.file}
    pending = [a2a_pb2.DESCRIPTOR]
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    while pending:  # dependencies first, each file once
        file = pending[-1]
        missing = [d for d in file.dependencies if d.name not in present]
        if missing:
            pending.extend(missing)
            continue
        pending.pop()
        if file.name in present:
            continue
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        ordered.append(proto)
        present.add(file.name)
    fds.file.extend(ordered)
    output.write_bytes(fds.SerializeToString())


def described_services(descriptor_set: Path | None, services: Sequence[str]) -> list[str]:
    """The transcoded ``services`` the descriptor set holds. Envoy rejects the whole
    listener for one service it cannot find, so a routes file newer than the contracts a
    running mesh was built with (a rolling upgrade) must leave that service out, not take
    the front door down."""
    if descriptor_set is None:
        return []
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    except (OSError, DecodeError):
        return list(services)  # Envoy says what is wrong with it
    known = {f"{f.package}.{s.name}" if f.package else s.name for f in files for s in f.service}
    missing = [name for name in services if name not in known]
    if missing:
        log.warning("transcoded_services_not_in_contracts", services=missing)
    return [name for name in services if name in known]
