"""`make breaking`: run `buf breaking` on the contracts against the previous main commit.

buf could read the against-input straight from git (`--against '.git#ref=HEAD~1'`), but
our workspace has a second module, `.build/protodeps` (the googleapis protos linked from
the installed wheel by tools/proto_deps.py), which is git-ignored and so absent from any
commit: buf would fail to resolve `google/api/annotations.proto`. Instead this script
exports the base commit's `proto/` and `buf.yaml` with `git archive` into a temporary
directory, links the same protodeps there, and runs `buf breaking <repo> --against <tmp>`.

Base commit: `$TESSERA_BREAKING_AGAINST` if set (any git revision); else `HEAD~1` when the
checkout is on `main` (or detached, as CI may be); else `main`, `origin/main`, then
`HEAD~1`, the first that exists. When none exists (first commit, shallow clone) or the base
has no contracts yet, it says why and exits 0: there is nothing to compare against.

Exit status: 0 no breaking change (or skipped), 1 breaking changes (buf's report on
stdout), 2 the check could not run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
PROTO_DEPS = TOOLS / "proto_deps.py"
CONTRACTS = "proto"
CONFIG = "buf.yaml"
DEPS_DIR = ".build/protodeps"


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )


def resolve(repo: Path, rev: str) -> str | None:
    """The commit id of ``rev``, or None if it does not exist in this clone."""
    result = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return result.stdout.strip() if result.returncode == 0 else None


def base_candidates(repo: Path) -> list[str]:
    explicit = os.environ.get("TESSERA_BREAKING_AGAINST")
    if explicit:
        return [explicit]
    branch = git(repo, "branch", "--show-current").stdout.strip()
    if branch in ("main", ""):  # on main, or detached (CI checkouts)
        return ["HEAD~1"]
    return ["main", "origin/main", "HEAD~1"]


def export(repo: Path, commit: str, target: Path) -> bool:
    """Write the base commit's contracts and buf.yaml into ``target``; False if it has none."""
    if git(repo, "cat-file", "-e", f"{commit}:{CONTRACTS}").returncode != 0:
        return False
    paths = [CONTRACTS]
    if git(repo, "cat-file", "-e", f"{commit}:{CONFIG}").returncode == 0:
        paths.append(CONFIG)
    archive = target / "base.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", commit, *paths],
            stdout=out,
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    archive.unlink()
    if CONFIG not in paths:  # a base older than the workspace config: use today's
        shutil.copy(repo / CONFIG, target / CONFIG)
    return True


def link_deps(workspace: Path) -> None:
    subprocess.run([sys.executable, str(PROTO_DEPS), str(workspace / DEPS_DIR)], check=True)


def default_buf() -> str:
    """The venv's buf (buf-bin wheel) beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "buf"
    return str(beside) if beside.exists() else shutil.which("buf") or "buf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None, help="git checkout (default: cwd)")
    parser.add_argument("--buf", default=default_buf(), help="buf executable")
    args = parser.parse_args(argv)

    top = git(args.repo or Path.cwd(), "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        print(f"breaking: not a git checkout: {top.stderr.strip()}", file=sys.stderr)
        return 2
    repo = Path(top.stdout.strip())

    candidates = base_candidates(repo)
    found = next(((rev, c) for rev in candidates if (c := resolve(repo, rev))), None)
    if found is None and os.environ.get("TESSERA_BREAKING_AGAINST"):
        print(
            f"breaking: no such commit: {candidates[0]} (TESSERA_BREAKING_AGAINST)", file=sys.stderr
        )
        return 2
    if found is None:
        shallow = git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        why = "this is a shallow clone" if shallow else "HEAD is the first commit"
        print(
            f"breaking: skipped: no base commit to compare against ({' / '.join(candidates)} "
            f"not found: {why}); fetch more history (git fetch --deepen=1) to check"
        )
        return 0
    rev, commit = found

    link_deps(repo)
    with tempfile.TemporaryDirectory(prefix="tessera-breaking-") as tmp:
        base = Path(tmp)
        if not export(repo, commit, base):
            print(f"breaking: skipped: {rev} ({commit[:12]}) has no {CONTRACTS}/ yet")
            return 0
        link_deps(base)
        print(f"breaking: buf breaking {CONTRACTS}/ against {rev} ({commit[:12]})", flush=True)
        result = subprocess.run(
            [args.buf, "breaking", ".", "--against", str(base), "--error-format", "text"],
            cwd=repo,
            check=False,
        )
    if result.returncode == 0:
        print("breaking: no breaking changes")
        return 0
    if result.returncode == 100:  # buf: check violations found
        print(
            f"breaking: the contracts above break compatibility with {rev}; "
            "add a new field/method/version instead (reserve removed numbers and names)",
            file=sys.stderr,
        )
        return 1
    print(f"breaking: buf breaking could not run (exit {result.returncode})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
