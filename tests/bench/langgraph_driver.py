"""`python -m tests.bench.langgraph_driver --mode sync|async --concurrency N --duration S
--db PATH`: the same 4-step supervisor workflow as a LangGraph StateGraph checkpointed by
SqliteSaver (sync mode: `graph.invoke` from N threads sharing one saver) or by
AsyncSqliteSaver (async mode: N asyncio tasks calling `graph.ainvoke`), one thread_id per
workflow. Prints one JSON object like the mesh driver's.

Durability: the savers keep their defaults (WAL journal; SQLite's default
`synchronous=FULL`, so every commit fsyncs the WAL) and commit every checkpoint. The
graph runs with `durability="sync"`: each step's checkpoint is committed before the next
step starts, which is what the mesh does (compare-and-set before dispatching). `--durability
async` (LangGraph's default) lets the next step run while the previous checkpoint is
written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from tests.bench.load import closed_loop, driver_parser
from tests.bench.workload import do_work, supervise, synthesize


class State(TypedDict, total=False):
    goal: str
    work: str | None
    route: str
    answer: dict[str, Any]


def supervisor_node(state: State) -> State:
    return {"route": supervise(state.get("work"))}


def worker_node(state: State) -> State:
    return {"work": do_work(str(state.get("goal", "")))}


def synthesizer_node(state: State) -> State:
    return {"answer": synthesize(state.get("work"))}


def route(state: State) -> str:
    return "worker" if state.get("route") == "worker" else "synthesizer"


def build(checkpointer: Any) -> Any:
    graph = StateGraph(State)
    graph.add_node("supervisor", supervisor_node)
    graph.add_node("worker", worker_node)
    graph.add_node("synthesizer", synthesizer_node)
    graph.add_edge(START, "supervisor")
    graph.add_conditional_edges("supervisor", route, ["worker", "synthesizer"])
    graph.add_edge("worker", "supervisor")
    graph.add_edge("synthesizer", END)
    return graph.compile(checkpointer=checkpointer)


def _check(result: dict[str, Any]) -> bool:
    return result.get("answer") == {"answer": "DONE: BENCH"}


def run_sync(args: argparse.Namespace) -> dict[str, Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(args.db, check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    graph = build(saver)
    t0 = time.perf_counter()
    window_start = t0 + args.warmup
    deadline = window_start + args.duration
    latencies: list[float] = []
    bad = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal bad
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            result = graph.invoke(
                {"goal": "bench"},
                {"configurable": {"thread_id": uuid.uuid4().hex}},
                durability=args.durability,
            )
            end = time.perf_counter()
            if window_start <= end <= deadline:
                with lock:
                    if _check(result):
                        latencies.append(end - began)
                    else:
                        bad += 1

    cpu: dict[str, float] = {}

    def sample_cpu() -> None:
        time.sleep(max(0.0, window_start - time.perf_counter()))
        cpu["start"] = time.process_time()
        time.sleep(max(0.0, deadline - time.perf_counter()))
        cpu["end"] = time.process_time()

    with ThreadPoolExecutor(args.concurrency + 1) as pool:
        futures = [pool.submit(client) for _ in range(args.concurrency)]
        futures.append(pool.submit(sample_cpu))
        for f in futures:
            f.result()
    checkpoints = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    conn.close()
    return _out(args, latencies, bad, synchronous, journal, checkpoints, cpu)


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(args.db) as saver:
        await saver.setup()
        async with saver.conn.execute("PRAGMA synchronous") as cur:
            synchronous = (await cur.fetchone() or [None])[0]
        async with saver.conn.execute("PRAGMA journal_mode") as cur:
            journal = (await cur.fetchone() or [None])[0]
        graph = build(saver)

        async def one(_: int) -> tuple[str, float]:
            began = time.perf_counter()
            result = await graph.ainvoke(
                {"goal": "bench"},
                {"configurable": {"thread_id": uuid.uuid4().hex}},
                durability=args.durability,
            )
            kind = "workflow_completed" if _check(result) else "wrong_result"
            return kind, time.perf_counter() - began

        report = await closed_loop(
            one, concurrency=args.concurrency, warmup=args.warmup, duration=args.duration
        )
        async with saver.conn.execute("SELECT count(*) FROM checkpoints") as cur:
            checkpoints = (await cur.fetchone() or [None])[0]
    bad = report["outcomes"].get("wrong_result", 0)
    cpu = {"start": 0.0, "end": report["client_cpu_s"]}
    return _out(args, report["latencies_s"], bad, synchronous, journal, checkpoints, cpu)


def _out(
    args: argparse.Namespace,
    latencies: list[float],
    bad: int,
    synchronous: Any,
    journal: Any,
    checkpoints: Any,
    cpu: dict[str, float],
) -> dict[str, Any]:
    return {
        "mode": args.mode,
        "durability": args.durability,
        "concurrency": args.concurrency,
        "window_s": args.duration,
        "completed": len(latencies),
        "outcomes": {"workflow_completed": len(latencies), "wrong_result": bad},
        "latencies_s": latencies,
        "sqlite": {"synchronous": synchronous, "journal_mode": journal},
        "checkpoints_total": checkpoints,
        "client_cpu_s": cpu["end"] - cpu["start"],
    }


if __name__ == "__main__":
    parser = driver_parser()
    parser.add_argument("--mode", choices=["sync", "async"], required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--durability", choices=["sync", "async"], default="sync")
    ns = parser.parse_args()
    report = run_sync(ns) if ns.mode == "sync" else asyncio.run(run_async(ns))
    print(json.dumps(report))
