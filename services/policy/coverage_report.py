"""What the policy directory's own test cases show each policy of the served set doing,
computed once per set version (``tessera policy test``'s report, for GetPolicySet)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from tessera.policy.cases import CaseError, load_cases, run_cases
from tessera.policy.coverage import coverage
from tessera.policy.engine import LoadedPolicySet
from tessera.v1 import policy_pb2

__all__ = ["CoverageReports"]

log = structlog.get_logger(__name__)


class CoverageReports:
    """``tests_dir``: the cases (``policy/tests``); missing: no coverage is reported."""

    def __init__(self, tests_dir: Path) -> None:
        self._tests_dir = tests_dir
        self._version = ""
        self._report: policy_pb2.PolicySetInfo | None = None
        self._lock = asyncio.Lock()

    async def of(self, ps: LoadedPolicySet) -> policy_pb2.PolicySetInfo:
        """The coverage fields of ``ps``'s PolicySetInfo."""
        async with self._lock:
            if self._report is None or self._version != ps.version:
                # Cedar evaluations of every case: off the event loop, once per version.
                self._report = await asyncio.to_thread(self._compute, ps)
                self._version = ps.version
            return self._report

    def _compute(self, ps: LoadedPolicySet) -> policy_pb2.PolicySetInfo:
        out = policy_pb2.PolicySetInfo()
        if not self._tests_dir.is_dir():
            return out
        try:
            cases = load_cases(self._tests_dir)
        except CaseError as exc:
            log.warning("policy_cases_unreadable", error=str(exc))
            return out
        results = run_cases(ps, cases)
        out.test_cases = len(results)
        out.failed_cases = sum(1 for r in results if not r.passed)
        for c in coverage(ps, results):
            out.coverage.add(
                policy_id=c.id,
                effect=c.effect,
                file=c.file,
                decided=len(c.determined),
                matched=len(c.matched),
                status=c.status,
            )
        return out
