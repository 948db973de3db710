"""The status page (``GET /`` on the health port) and the figures it shows (``GET /status.json``).

Everything on it comes from the process's Prometheus registry, read in one pass, so the page and
``/metrics`` never disagree: rates are taken between the page's own reads (``Rates``), the rest
are the metrics' current values. The page refreshes itself every two seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

from prometheus_client import REGISTRY

RATE_WINDOW = 10.0  # seconds the rates on the page are taken over (at most)


def samples() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every ``ingest_`` sample now: name -> labels (sorted pairs) -> value."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in REGISTRY.collect():
        if family.name.startswith("ingest_"):
            for sample in family.samples:
                found[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: dict[str, dict[Any, float]], name: str) -> float:
    return sum(found.get(name, {}).values())


class Rates:
    """Counters' rates between reads of the page: over the last RATE_WINDOW seconds, or since the
    previous read when that is longer ago."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, dict[str, float]]] = deque()

    def update(self, counters: dict[str, float]) -> dict[str, float]:
        now = time.monotonic()
        self._seen.append((now, counters))
        while len(self._seen) > 2 and now - self._seen[0][0] > RATE_WINDOW:  # (the previous read stays)
            self._seen.popleft()
        then, before = self._seen[0]
        if now - then <= 0:
            return dict.fromkeys(counters, 0.0)
        return {k: max(0.0, (v - before.get(k, 0.0)) / (now - then)) for k, v in counters.items()}


COUNTED = {
    "records_per_s": "ingest_records_total",
    "chunks_per_s": "ingest_chunks_written_total",
    "embedding_inputs_per_s": "ingest_embedding_inputs_total",
    "fetched_bytes_per_s": "ingest_fetched_bytes_total",
}


def status(rates: Rates, *, partitions: list[str], down: dict[str, str], settings: Any) -> dict[str, Any]:
    """The figures the page shows (``/status.json``)."""
    found = samples()
    lag = {
        f"{dict(labels)['topic']}/{dict(labels)['partition']}": int(value)
        for labels, value in sorted(found.get("ingest_consumer_lag", {}).items())
    }
    loop_count = total(found, "ingest_event_loop_lag_seconds_count")
    return {
        # /readyz's answer without its live checks of the dependencies: partitions, no circuit open
        "ready": bool(partitions) and not down,
        "partitions": partitions,
        "throughput": {
            k: round(v, 2) for k, v in rates.update({k: total(found, n) for k, n in COUNTED.items()}).items()
        },
        "totals": {
            "records": int(total(found, "ingest_records_total")),
            "chunks_written": int(total(found, "ingest_chunks_written_total")),
            "dead_letters": int(total(found, "ingest_dead_letters_total")),
            "commits": int(total(found, "ingest_commits_total")),
            "rebalances": int(total(found, "ingest_rebalances_total")),
        },
        "lag": lag,
        "lag_total": sum(lag.values()),
        "in_flight": {
            "records": int(total(found, "ingest_in_flight_records")),
            "bytes": int(total(found, "ingest_in_flight_bytes")),
            "backlog_bytes": int(total(found, "ingest_backlog_bytes")),
            "paused": bool(total(found, "ingest_paused")),
        },
        "queues": {
            dict(labels)["stage"]: int(v) for labels, v in found.get("ingest_queue_depth", {}).items()
        },
        "dependencies": {
            dict(labels)["dependency"]: (
                "up" if v else f"down: {down.get(dict(labels)['dependency'], '')}".rstrip(": ")
            )
            for labels, v in sorted(found.get("ingest_dependency_up", {}).items())
        },
        "embedding": {
            "concurrency_limit": round(total(found, "ingest_embedding_concurrency_limit"), 2),
            "requests_in_flight": int(total(found, "ingest_embedding_requests_in_flight")),
            "max_rpm": settings.embedding_max_rpm,
            "max_tpm": settings.embedding_max_tpm,
            "model": settings.embedding_model,
        },
        "database": {
            dict(labels)["state"]: int(v)
            for labels, v in found.get("ingest_database_connections", {}).items()
        },
        "generation_served": int(total(found, "ingest_generation_served")),
        "event_loop": {
            "wakeups": int(loop_count),
            "mean_lag_ms": round(1000 * total(found, "ingest_event_loop_lag_seconds_sum") / loop_count, 2)
            if loop_count
            else 0.0,
        },
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ingest-worker</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} .sub{color:#666;margin-bottom:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:1em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
h2{font-size:1em;margin:.2em 0 .5em;color:#444} table{border-collapse:collapse;width:100%}
td{padding:2px 4px;border-bottom:1px solid #eee} td.v{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600}
</style></head><body>
<h1>ingest-worker <span id="ready"></span></h1>
<div class="sub">refreshed every 2 s from <a href="status.json">status.json</a>
(the same registry as <a href="metrics">/metrics</a>) &middot; <span id="at"></span></div>
<div class="grid">
<section><h2>Throughput (last 10 s)</h2><table id="throughput"></table></section>
<section><h2>Totals</h2><table id="totals"></table></section>
<section><h2>Lag per partition (<span id="lag_total"></span>)</h2><table id="lag"></table></section>
<section><h2>In flight</h2><table id="in_flight"></table><h2>Queues</h2><table id="queues"></table></section>
<section><h2>Dependencies (circuits)</h2><table id="dependencies"></table></section>
<section><h2>Embedding API</h2><table id="embedding"></table></section>
<section><h2>Database and index</h2><table id="database"></table></section>
<section><h2>Event loop</h2><table id="event_loop"></table></section>
</div>
<script>
function rows(id, data) {
  const t = document.getElementById(id); t.innerHTML = "";
  for (const [k, v] of Object.entries(data)) {
    const r = t.insertRow(); r.insertCell().textContent = k;
    const c = r.insertCell(); c.className = "v"; c.dataset.key = id + "." + k;
    c.textContent = typeof v === "number" ? v.toLocaleString("en-US", {maximumFractionDigits: 2}) : String(v);
    c.dataset.value = String(v);
    if (v === "up") c.className += " ok"; else if (String(v).startsWith("down")) c.className += " bad";
  }
}
async function refresh() {
  try {
    const s = await (await fetch("status.json", {cache: "no-store"})).json();
    const ready = document.getElementById("ready");
    ready.textContent = s.ready ? "ready" : "not ready"; ready.className = s.ready ? "ok" : "bad";
    document.getElementById("lag_total").textContent = s.lag_total.toLocaleString("en-US");
    rows("throughput", s.throughput); rows("totals", s.totals); rows("lag", s.lag);
    rows("in_flight", s.in_flight); rows("queues", s.queues); rows("dependencies", s.dependencies);
    rows("embedding", s.embedding);
    const db = {...s.database, generation_served: s.generation_served};
    rows("database", {...db, partitions: s.partitions.length});
    rows("event_loop", s.event_loop);
    document.getElementById("at").textContent = new Date().toISOString();
    document.body.dataset.loaded = "true";
  } catch (e) { document.getElementById("at").textContent = "no answer: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
