"""Benchmark: a governed tool call against a bare 2-hop gRPC chain, measured in one run.

governed = agent → tool proxy → (policy Check ∥ use ledger) + token check + secret + `allow`
audit record → the no-op built-in tool; bare = client → relay → no-op server on the same
gRPC server stack; embedded = governed with ``policy_mode = "embedded"`` (the policy set
decided in the proxy's process, no policy hop). All run in-process in ONE subprocess on uvloop (see
``_tool_calls_run.py``); NATS (``sync_interval: always``) and OpenBao are the real servers.

Not a timed test (DESIGN.md, Testing): it prints p50/p99 and the ratio and writes
``.tessera/bench/tool_calls.json``; it fails only if the calls fail or the audit chains do not
verify. ``TESSERA_BENCH_N`` (default 2000 per path), ``TESSERA_BENCH_PROFILE=<path>``
(cProfile of the governed blocks; ``TESSERA_BENCH_PROFILE_PATH=embedded`` profiles another path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench._tool_calls_fixtures import tool_calls_bao, tool_calls_creds
from tests.bench._tool_calls_run import REPO
from tests.conftest import OpenBao

__all__ = ["tool_calls_bao", "tool_calls_creds"]

OUTPUT = REPO / ".tessera" / "bench" / "tool_calls.json"


@pytest.mark.bench
@pytest.mark.slow
def test_governed_call_against_bare_chain(
    nats_url: str,
    tool_calls_bao: OpenBao,
    tool_calls_creds: dict[str, Path],
    tmp_path: Path,
) -> None:
    n = int(os.environ.get("TESSERA_BENCH_N", "2000"))
    config = {
        "nats_url": nats_url,
        "vault_addr": tool_calls_bao.addr,
        "creds": {k: str(v) for k, v in tool_calls_creds.items()},
        "n": n,
        "warmup": 300,
        "rounds": 10,
        "profile": os.environ.get("TESSERA_BENCH_PROFILE", ""),
        "profile_path": os.environ.get("TESSERA_BENCH_PROFILE_PATH", "governed"),
    }
    cfg_file, out_file = tmp_path / "config.json", tmp_path / "result.json"
    cfg_file.write_text(json.dumps(config))
    subprocess.run(
        [sys.executable, "-m", "tests.bench._tool_calls_run", str(cfg_file), str(out_file)],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    result = json.loads(out_file.read_text())
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    g, b = result["governed"], result["bare_2hop"]
    print(
        f"\nTOOL_CALLS governed p50={g['p50_ms']}ms p99={g['p99_ms']}ms | "
        f"bare 2-hop p50={b['p50_ms']}ms p99={b['p99_ms']}ms | "
        f"ratio p50={result['ratio_p50']} | raw grpc 2-hop p50="
        f"{result['raw_grpc_2hop']['p50_ms']}ms | governed with sync policy audit p50="
        f"{result['governed_policy_audit_sync']['p50_ms']}ms p99="
        f"{result['governed_policy_audit_sync']['p99_ms']}ms | governed with embedded policy "
        f"p50={result['governed_policy_embedded']['p50_ms']}ms "
        f"p99={result['governed_policy_embedded']['p99_ms']}ms "
        f"ratio p50={result['ratio_p50_embedded']} | -> {OUTPUT}"
    )
    assert result["governed"]["n"] >= 1000
    assert result["governed_policy_embedded"]["n"] >= 1000
    assert result["audit"]["ok"], result["audit"]["issues"]
