"""Benchmark: a governed tool call against a bare 2-hop gRPC chain, measured in one run,
with identity on: every gRPC hop of both sides is mTLS with workload certificates of the
same mesh CA (OpenBao PKI).

governed = agent (``agent-bench``'s certificate) → tool proxy → (policy Check ∥ use ledger)
+ token check + secret + `allow` audit record → the no-op built-in tool; bare = the same
agent → relay → no-op server on the same gRPC server stack and mTLS; embedded = governed
in the default ``policy_mode = "distributed"`` (the policy service's set decided in the
proxy's process, no policy hop). The plaintext bare chain is measured once more beside
them, so the report shows what mTLS itself costs. All run in-process in ONE subprocess on
uvloop (see ``_tool_calls_run.py``); NATS (``sync_interval: always``) and OpenBao are the
real servers.

Not a timed test (DESIGN.md, Testing): it prints p50/p99 and the ratios and writes
``.tessera/bench/tool_calls.json``; it fails only if the calls fail, a hop was not
authenticated, or the audit chains do not verify. ``TESSERA_BENCH_N`` (default 2000 per
path), ``TESSERA_BENCH_PROFILE=<path>`` (cProfile of the governed blocks;
``TESSERA_BENCH_PROFILE_PATH=embedded`` profiles another path).

Two variants: the full one (``bench`` and ``slow``: ``make bench``) and a bounded smoke
(``bench`` only, so ``make test`` runs it: 200 calls per path, its JSON in pytest's tmp dir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench._tool_calls_fixtures import tool_calls_bao, tool_calls_creds
from tests.bench._tool_calls_run import REPO
from tests.conftest import OpenBao

__all__ = ["tool_calls_bao", "tool_calls_creds"]

OUTPUT = REPO / ".tessera" / "bench" / "tool_calls.json"


def _run(
    *,
    nats_url: str,
    bao: OpenBao,
    creds: dict[str, Path],
    tmp_path: Path,
    n: int,
    warmup: int,
    rounds: int,
    output: Path,
) -> dict[str, Any]:
    config = {
        "nats_url": nats_url,
        "vault_addr": bao.addr,
        "creds": {k: str(v) for k, v in creds.items()},
        "n": n,
        "warmup": warmup,
        "rounds": rounds,
        "profile": os.environ.get("TESSERA_BENCH_PROFILE", ""),
        "profile_path": os.environ.get("TESSERA_BENCH_PROFILE_PATH", "governed"),
    }
    cfg_file, out_file = tmp_path / "config.json", tmp_path / "result.json"
    cfg_file.write_text(json.dumps(config))
    # tests/conftest.py defaults TESSERA_INSECURE_PLAINTEXT to 1 for in-process fixtures;
    # the benchmark runs with identity on, as `tessera up` does.
    env = {**os.environ, "TESSERA_INSECURE_PLAINTEXT": "0"}
    subprocess.run(
        [sys.executable, "-m", "tests.bench._tool_calls_run", str(cfg_file), str(out_file)],
        cwd=REPO,
        check=True,
        timeout=600,
        env=env,
    )
    result: dict[str, Any] = json.loads(out_file.read_text())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    g, b, pl = result["governed"], result["bare_2hop"], result["bare_2hop_plaintext"]
    sync, emb, mtls = (
        result["governed_policy_audit_sync"],
        result["governed_policy_embedded"],
        result["mtls_cost"],
    )
    print(
        f"\nTOOL_CALLS (mTLS on every hop) governed p50={g['p50_ms']}ms p99={g['p99_ms']}ms | "
        f"bare 2-hop mTLS p50={b['p50_ms']}ms p99={b['p99_ms']}ms | "
        f"ratio p50={result['ratio_p50']} p99={result['ratio_p99']} (targets 1.3 / 1.5) | "
        f"governed with sync policy audit p50={sync['p50_ms']}ms p99={sync['p99_ms']}ms "
        f"ratio p50={result['ratio_p50_policy_audit_sync']} | governed with embedded policy "
        f"p50={emb['p50_ms']}ms p99={emb['p99_ms']}ms ratio p50={result['ratio_p50_embedded']} "
        f"p99={result['ratio_p99_embedded']}\n"
        f"TOOL_CALLS mTLS cost: bare 2-hop plaintext p50={pl['p50_ms']}ms p99={pl['p99_ms']}ms, "
        f"bare mTLS / plaintext p50={mtls['bare_ratio_p50']} p99={mtls['bare_ratio_p99']} "
        f"(+{mtls['bare_delta_p50_ms']}ms p50 over 2 hops) | raw grpc 2-hop (plaintext) p50="
        f"{result['raw_grpc_2hop']['p50_ms']}ms | -> {output}"
    )
    identity = result["identity"]
    bare_hops = identity["bare"]
    assert bare_hops["mtls"], identity
    assert bare_hops["relay"]["caller"] == identity["client"], identity
    assert bare_hops["noop"]["caller"] == bare_hops["relay"]["served_as"], identity
    assert identity["tool_proxy"] and identity["policy"], identity
    assert result["audit"]["ok"], result["audit"]["issues"]
    return result


@pytest.mark.bench
@pytest.mark.slow
def test_governed_call_against_bare_chain(
    nats_url: str,
    tool_calls_bao: OpenBao,
    tool_calls_creds: dict[str, Path],
    tmp_path: Path,
) -> None:
    n = int(os.environ.get("TESSERA_BENCH_N", "2000"))
    result = _run(
        nats_url=nats_url,
        bao=tool_calls_bao,
        creds=tool_calls_creds,
        tmp_path=tmp_path,
        n=n,
        warmup=300,
        rounds=10,
        output=OUTPUT,
    )
    assert result["governed"]["n"] >= 1000
    assert result["governed_policy_embedded"]["n"] >= 1000


@pytest.mark.bench
def test_governed_call_against_bare_chain_bounded(
    nats_url: str,
    tool_calls_bao: OpenBao,
    tool_calls_creds: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Every path at small N: the benchmark still runs, with identity on every hop."""
    result = _run(
        nats_url=nats_url,
        bao=tool_calls_bao,
        creds=tool_calls_creds,
        tmp_path=tmp_path,
        n=200,
        warmup=50,
        rounds=4,
        output=tmp_path / "tool_calls.json",
    )
    assert result["governed"]["n"] == 200
    assert result["bare_2hop"]["n"] == 200
