"""Run one component as its own process group, tracked by a PID file.

``<data_dir>/run/<name>.pid`` holds JSON: pid, argv, the kernel start time of the process
and the log path. A PID file is trusted only if a live process has that PID, the same start
time and the same arguments, so a PID reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_PROC = Path("/proc")

# Popen objects of the children this process started, so their exit is reaped (no zombies,
# no "still running" warnings) and their exit code can be reported.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessRecord:
    """What we know about a process we started."""

    name: str
    pid: int
    argv: tuple[str, ...]
    start_time: int | None
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    """The Tessera settings it was started with (``TESSERA_*``; never other variables,
    which may hold a user's secrets): what :func:`respawn` starts it with again."""
    cwd: str | None = None


class StopResult(enum.Enum):
    """Outcome of :func:`stop`."""

    STOPPED = "stopped"  # exited after SIGTERM
    KILLED = "killed"  # needed SIGKILL
    STALE = "stale"  # PID file named a process that no longer exists (or is not ours)
    NOT_RUNNING = "not running"  # no PID file


class StopFailed(RuntimeError):
    """The process survived SIGKILL (should not happen outside D-state)."""


def run_dir(data_dir: Path) -> Path:
    return data_dir / "run"


def logs_dir(data_dir: Path) -> Path:
    return data_dir / "logs"


def pid_file(data_dir: Path, name: str) -> Path:
    return run_dir(data_dir) / f"{name}.pid"


def log_file(data_dir: Path, name: str) -> Path:
    return logs_dir(data_dir) / f"{name}.log"


def _start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of ``pid``; None without /proc."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall


def _is_zombie(pid: int) -> bool:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def _cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def returncode(pid: int) -> int | None:
    """Exit code of a child started by :func:`spawn` in this process; None if unknown/running."""
    proc = _children.get(pid)
    return None if proc is None else proc.poll()


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def is_alive(record: ProcessRecord) -> bool:
    """Whether the process in ``record`` is still the one we started."""
    if not pid_exists(record.pid):
        return False
    if not _PROC.is_dir():
        return True
    if record.start_time is not None and _start_time(record.pid) != record.start_time:
        return False
    cmdline = _cmdline(record.pid)
    # argv[0] changes when a wheel's Python shim execs the real binary; the arguments don't.
    return cmdline is not None and cmdline[1:] == record.argv[1:]


_KEPT_ENV = frozenset({"PYTHONUNBUFFERED"})


def spawn(
    data_dir: Path,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRecord:
    """Start ``argv`` in a new session, output appended to ``<data_dir>/logs/<name>.log``.

    Writes the PID file before returning. The process outlives the caller.
    """
    run_dir(data_dir).mkdir(parents=True, exist_ok=True)
    logs_dir(data_dir).mkdir(parents=True, exist_ok=True)
    log_path = log_file(data_dir, name)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        argv=tuple(argv),
        start_time=_start_time(proc.pid),
        log_path=str(log_path),
        env={k: v for k, v in (env or {}).items() if k in _KEPT_ENV or k.startswith("TESSERA_")},
        cwd=None if cwd is None else str(cwd),
    )
    path = pid_file(data_dir, name)
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)
    log.debug("process_started", component=name, pid=proc.pid, log=str(log_path))
    return record


def read_record(data_dir: Path, name: str) -> ProcessRecord | None:
    """The PID file of ``name``, or None if absent or unreadable."""
    try:
        data = json.loads(pid_file(data_dir, name).read_text())
        return ProcessRecord(
            name=str(data["name"]),
            pid=int(data["pid"]),
            argv=tuple(str(a) for a in data["argv"]),
            start_time=None if data.get("start_time") is None else int(data["start_time"]),
            log_path=str(data["log_path"]),
            env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
            cwd=None if data.get("cwd") is None else str(data["cwd"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def recorded_names(data_dir: Path) -> list[str]:
    """Names of every component with a PID file, sorted."""
    directory = run_dir(data_dir)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.pid"))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return


def _wait_gone(pid: int, deadline: float) -> bool:
    delay = 0.01
    while time.monotonic() < deadline:
        if not pid_exists(pid):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return not pid_exists(pid)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``.

    Zombies are ignored: a member reparented to init stays one until init reaps it.
    """
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    delay = 0.01
    while True:
        if not _group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def stop(data_dir: Path, name: str, *, timeout: float = 10.0) -> StopResult:
    """Stop ``name``: SIGTERM to its process group, SIGKILL after ``timeout`` seconds.

    Removes the PID file once the process is verifiably gone. A stale PID file (dead
    process, or a PID now used by another program) is removed without signalling anything.
    """
    path = pid_file(data_dir, name)
    if not path.exists():
        return StopResult.NOT_RUNNING
    record = read_record(data_dir, name)
    if record is None or not is_alive(record):
        path.unlink(missing_ok=True)
        log.info("stale_pid_file_removed", component=name)
        return StopResult.STALE
    _signal_group(record.pid, signal.SIGTERM)
    result = StopResult.STOPPED
    if not _wait_gone(record.pid, time.monotonic() + timeout):
        log.warning("process_kill", component=name, pid=record.pid, after_seconds=timeout)
        _signal_group(record.pid, signal.SIGKILL)
        result = StopResult.KILLED
        if not _wait_gone(record.pid, time.monotonic() + 5.0):
            raise StopFailed(f"{name} (pid {record.pid}) survived SIGKILL")
    # Members of the group that outlive the leader (e.g. the child of a keeper shell) got
    # the same SIGTERM; give them the rest of the deadline, then SIGKILL.
    if not _wait_group_gone(record.pid, time.monotonic() + timeout):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
        _wait_group_gone(record.pid, time.monotonic() + 5.0)
    path.unlink(missing_ok=True)
    _children.pop(record.pid, None)
    log.debug("process_stopped", component=name, pid=record.pid, result=result.value)
    return result


def kill(data_dir: Path, name: str) -> ProcessRecord | None:
    """SIGKILL ``name``'s process group at once, as a crash would (nothing flushed);
    the PID file stays, so :func:`respawn` can start the same command again. None if
    it was not running."""
    record = read_record(data_dir, name)
    if record is None or not is_alive(record):
        return None
    _signal_group(record.pid, signal.SIGKILL)
    if not _wait_gone(record.pid, time.monotonic() + 5.0):
        raise StopFailed(f"{name} (pid {record.pid}) survived SIGKILL")
    _wait_group_gone(record.pid, time.monotonic() + 5.0)
    _children.pop(record.pid, None)
    return record


def reload(data_dir: Path, name: str) -> bool:
    """SIGHUP ``name`` (nats-server re-reads its configuration and TLS files on it); False
    when it is not running as recorded."""
    record = read_record(data_dir, name)
    if record is None or not is_alive(record):
        return False
    os.kill(record.pid, signal.SIGHUP)
    return True


def respawn(data_dir: Path, record: ProcessRecord) -> ProcessRecord:
    """Start ``record``'s component again with the command, settings and directory it
    was started with (the rest of the environment is this process's). Read the record
    before stopping the old process: stopping removes the PID file."""
    if is_alive(record):
        raise RuntimeError(f"{record.name} is still running (pid {record.pid})")
    return spawn(
        data_dir,
        record.name,
        record.argv,
        env={**os.environ, **record.env},
        cwd=None if record.cwd is None else Path(record.cwd),
    )


def tail(path: Path | str, *, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if missing)."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
