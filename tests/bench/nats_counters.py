"""nats-server's own counters of what a benchmark run wrote: messages appended per stream
(each fsynced with `sync_interval: always`), durable consumers' acknowledgements, and bytes
clients sent the server, read from its monitoring endpoint."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def jetstream_counters(monitor_url: str, namespace: str) -> dict[str, Any]:
    """nats-server's own counters (monitoring endpoint): per stream of ``namespace`` (KV
    buckets' streams included) its last sequence and what each durable consumer has
    acknowledged (`/jsz`), and the bytes the server received from clients (`/varz`).
    With `sync_interval: always` every appended message is an fsynced write; on the
    work-queue stream an acknowledgement also removes its message."""
    with urllib.request.urlopen(
        f"{monitor_url}/jsz?accounts=true&streams=true&consumers=true&config=true", timeout=5
    ) as reply:
        jsz = json.load(reply)
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=5) as reply:
        varz = json.load(reply)
    streams: dict[str, dict[str, Any]] = {}
    ns = namespace.lower()
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            name = stream["name"]
            if ns not in name.lower():
                continue
            short = name.lower().replace(ns, "").strip("_") or name
            streams[short] = {
                "appended": int((stream.get("state") or {}).get("last_seq") or 0),
                "acked": {
                    c["name"]: int((c.get("ack_floor") or {}).get("consumer_seq") or 0)
                    for c in stream.get("consumer_detail") or []
                    if (c.get("config") or {}).get("durable_name")
                },
            }
    return {"streams": streams, "in_bytes": int(varz.get("in_bytes") or 0)}


def jetstream_per_wf(
    before: dict[str, Any], after: dict[str, Any], workflows: int
) -> dict[str, Any]:
    """Writes per workflow over a window: messages appended (fsynced) per stream and in
    all, what durable consumers acknowledged, and bytes clients sent the server."""
    done = max(1, workflows)
    old = before["streams"]
    appended = {
        s: (v["appended"] - old.get(s, {}).get("appended", 0)) / done
        for s, v in after["streams"].items()
    }
    acks = sum(
        n - old[s]["acked"][c]
        for s, v in after["streams"].items()
        for c, n in v["acked"].items()
        if c in old.get(s, {}).get("acked", {})
    )
    return {
        "appended_per_wf": round(sum(appended.values()), 2),
        "appended_per_wf_by_stream": {k: round(v, 2) for k, v in sorted(appended.items()) if v},
        "durable_acks_per_wf": round(acks / done, 2),
        "bytes_received_per_wf": round((after["in_bytes"] - before["in_bytes"]) / done),
    }
