"""`make breaking` (tools/check_breaking.py) on throwaway git copies of the contracts.

Each test copies `proto/` and `buf.yaml` into a temporary git repository whose first
commit is today's contracts, edits the copy (never the real proto/), commits, and runs the
real script with the real buf: the previous commit is the base, as on main.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.launcher.topology import project_root

PROJECT_ROOT = project_root(Path(__file__).parent)
SCRIPT = PROJECT_ROOT / "tools" / "check_breaking.py"
COORDINATOR = Path("proto/tessera/v1/coordinator.proto")


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
         "-c", "commit.gpgsign=false", "-C", str(repo), *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A git repo on `main` with one commit: a copy of today's proto workspace."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(PROJECT_ROOT / "proto", repo / "proto")
    shutil.copy(PROJECT_ROOT / "buf.yaml", repo / "buf.yaml")
    (repo / ".gitignore").write_text(".build/\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "contracts")
    return repo


def edit(repo: Path, old: str, new: str, path: Path = COORDINATOR) -> None:
    """Replace one exact snippet of a proto file and commit the change."""
    text = (repo / path).read_text()
    assert text.count(old) == 1, f"snippet not found exactly once in {path}: {old!r}"
    (repo / path).write_text(text.replace(old, new))
    git(repo, "commit", "-q", "-am", "edit")


def check_breaking(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_unchanged_contracts_pass(workspace: Path) -> None:
    git(workspace, "commit", "-q", "--allow-empty", "-m", "nothing")
    result = check_breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against HEAD~1" in result.stdout
    assert "no breaking changes" in result.stdout


def test_deleting_a_field_is_breaking_and_named(workspace: Path) -> None:
    edit(
        workspace,
        "  // The goal it was started with.\n  string goal = 15;\n",
        "",
    )
    result = check_breaking(workspace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "proto/tessera/v1/coordinator.proto" in result.stdout
    assert 'field "15" with name "goal" on message "Workflow" was deleted' in result.stdout
    assert "FIELD_NO_DELETE" in result.stdout or "deleted" in result.stdout


def test_changing_a_field_type_is_breaking_and_named(workspace: Path) -> None:
    edit(
        workspace,
        "  // Maximum results per page (default 50, max 500).\n  int32 page_size = 1;\n",
        "  // Maximum results per page (default 50, max 500).\n  string page_size = 1;\n",
    )
    result = check_breaking(workspace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "coordinator.proto" in result.stdout
    assert '"page_size"' in result.stdout and '"ListWorkflowsRequest"' in result.stdout
    assert 'from "int32" to "string"' in result.stdout


def test_adding_a_field_is_not_breaking(workspace: Path) -> None:
    edit(
        workspace,
        "  string goal = 15;\n",
        "  string goal = 15;\n  // Labels set by the caller.\n  map<string, string> labels = 99;\n",
    )
    result = check_breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no breaking changes" in result.stdout


def test_uncommitted_breaking_edit_is_caught_against_the_previous_commit(
    workspace: Path,
) -> None:
    git(workspace, "commit", "-q", "--allow-empty", "-m", "second")
    path = workspace / COORDINATOR
    path.write_text(path.read_text().replace("  rpc CancelWorkflow", "  rpc AbortWorkflow", 1))
    result = check_breaking(workspace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert '"CancelWorkflow"' in result.stdout


def test_first_commit_is_skipped_with_a_reason(workspace: Path) -> None:
    result = check_breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "first commit" in result.stdout


def test_shallow_clone_is_skipped_with_a_reason(workspace: Path, tmp_path: Path) -> None:
    edit(workspace, "  string goal = 15;\n", "  string goal = 15;\n  string owner = 99;\n")
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", "--branch", "main",
         f"file://{workspace}", str(shallow)],
        check=True, capture_output=True,
    )  # fmt: skip
    result = check_breaking(shallow)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "shallow clone" in result.stdout


def test_an_explicit_base_that_does_not_exist_fails(workspace: Path) -> None:
    result = check_breaking(workspace, TESSERA_BREAKING_AGAINST="no-such-ref")
    assert result.returncode == 2
    assert "no such commit: no-such-ref" in result.stderr
