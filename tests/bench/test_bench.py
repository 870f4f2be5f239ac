"""``luthien-control bench --quick`` end to end: it runs, prints the table, writes the JSON.

Figures are printed, never asserted: timing on a shared CI machine proves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_TIMEOUT = 150.0  # a bound against hanging: the run takes about 40 s on a quiet machine
SCENARIOS = {
    "stream_1",
    "stream_16",
    "stream_64",
    "nonstream_32",
    "unpaced_32",
    "open_64",
    "open_many",
    # Issue 11: 64 open streams right after the throughput scenarios, on the same proxy;
    # non-streamed requests/s before and after a burst that grows the backend pool.
    "open_64_loaded",
    "pool_512",
    # Anthropic's Messages API, streamed, beside chat: paced at 64 clients, and unpaced.
    "messages_stream_64",
    "messages_unpaced_32",
}


def test_quick_bench_runs_end_to_end(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "luthien_control.bench", "--quick", "--json", str(results)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)  # the figures, for whoever reads the CI log
    assert "added/ratio" in run.stdout
    assert "requests/s" in run.stdout and "chunks/s" in run.stdout
    assert "round 1/1" in run.stderr  # progress was shown

    document = json.loads(results.read_text())
    assert {
        "date",
        "machine",
        "config",
        "proxy",
        "verification",
        "summary",
        "targets",
        "rounds",
    } <= document.keys()
    assert document["config"]["quick"] is True
    assert set(document["summary"]) == SCENARIOS
    stream = document["summary"]["stream_64"]
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms"):
        assert {"direct", "proxy", "added"} <= stream[metric].keys()
    assert {"direct", "proxy", "ratio"} <= document["summary"]["nonstream_32"][
        "requests_per_s"
    ].keys()
    assert {"direct", "proxy", "ratio"} <= document["summary"]["unpaced_32"]["chunks_per_s"].keys()
    # The Messages API rows: the same figures as chat's, labelled as Messages.
    assert "Messages API (/v1/messages), streamed, 16 chunks 20 ms apart, 64 clients" in run.stdout
    assert "Messages API (/v1/messages), streamed, no pacing, 32 clients" in run.stdout
    messages_stream = document["summary"]["messages_stream_64"]
    assert messages_stream["api"] == "messages" and messages_stream["kind"] == "stream"
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "ttfb_p50_ms", "gap_p50_ms", "gap_p99_ms"):
        assert {"direct", "proxy", "added"} <= messages_stream[metric].keys()
    messages_unpaced = document["summary"]["messages_unpaced_32"]
    assert {"direct", "proxy", "ratio"} <= messages_unpaced["chunks_per_s"].keys()
    assert "proxy" in messages_unpaced["cpu_ms_per_1000_chunks"]
    assert document["summary"]["stream_64"]["api"] == "chat"
    for name in ("messages_stream_64", "messages_unpaced_32"):
        for side in ("direct", "proxy"):
            # Streams really went through: /v1/messages answered on both sides.
            assert document["rounds"][0][name][side]["load"]["ok"] > 0, (name, side)
    assert not [p for p in document["verification"]["problems"] if "Messages" in p]
    assert "proxy" in document["summary"]["open_many"]["rss_mb"]
    # Memory after load and after the burst of open streams, and the pool's burst.
    assert document["summary"]["open_64_loaded"]["loaded"] is True
    assert document["summary"]["open_64_loaded"]["rss_mb"]["proxy"] > 0
    assert {"start", "after_load", "before_open"} <= document["idle_rss"].keys()
    assert "right after the throughput scenarios (same proxy)" in run.stdout
    many = document["summary"]["open_many"]
    assert many["rss_after_mb"]["proxy"] > 0 and many["rss_kept_mb"]["proxy"] is not None
    assert "RSS, all closed, after an idle moment" in run.stdout
    pool = document["summary"]["pool_512"]
    assert pool["kind"] == "pool" and pool["burst"] == 512
    for metric in ("requests_per_s_before", "requests_per_s_after"):
        assert {"direct", "proxy", "ratio"} <= pool[metric].keys()
        assert pool[metric]["proxy"] > 0
    assert pool["after_over_before"]["proxy"] > 0
    assert "before and after a burst of 512 concurrent requests" in run.stdout
    for side in ("direct", "proxy"):
        runs = document["rounds"][0]["pool_512"][side]["runs"]
        assert runs["burst"]["load"]["ok"] == 512, side  # every request of the burst answered
    assert "proxy" in document["summary"]["unpaced_32"]["cpu_ms_per_1000_chunks"]
    # CPU time is read once the server went quiet after the load (its writer's backlog
    # counted with the load), and the wait is in the results.
    assert document["rounds"][0]["nonstream_32"]["proxy"]["server_settle_s"] > 0
    names = {target["name"] for target in document["targets"]}
    assert {
        "added_ttft_p50_64",
        "requests_per_s_ratio",
        "open_many_errors",
        "leak_scan_per_chunk_ratio",
        "rss_mb_64_loaded",
        "pool_after_over_before",
    } <= names
    # The leak scan: CPU per chunk of 1 KB streams and of one 1 MB stream, same chunk count.
    assert "CPU per chunk, 1 MB stream" in run.stdout
    leak_scan = document["leak_scan"]
    assert leak_scan["chunks"] == 65536 and leak_scan["large_stream_bytes"] == 1024 * 1024
    assert leak_scan["small_us_per_chunk"] > 0 and leak_scan["large_us_per_chunk"] > 0
    assert "Messages API text_delta events" in run.stdout
    messages_scan = leak_scan["messages"]
    assert messages_scan["small_us_per_chunk"] > 0 and messages_scan["large_us_per_chunk"] > 0
    assert 0 < messages_scan["large_chunks_passed"] <= leak_scan["chunks"]
    assert "leak_scan_messages_per_chunk_ratio" in names
    for target in document["targets"]:
        assert target["met"] in (True, False, None)
    # Every round measured both sides of every scenario, and the generator reported its CPU.
    for scenario in document["rounds"][0].values():
        assert set(scenario) == {"direct", "proxy"}
        assert scenario["proxy"]["load"]["cpu_share"] >= 0
