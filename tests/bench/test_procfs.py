"""The bench's CPU reading counts what a server does after the load has ended."""

from __future__ import annotations

import subprocess
import sys

from luthien_control.bench.procfs import cpu_seconds, settled_cpu_seconds

# Waits for a line, burns CPU_AFTER seconds of CPU, then idles until its input closes.
WORKER = """
import sys, time
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < float(sys.argv[1]):
    pass
print("done", flush=True)
sys.stdin.readline()
"""
CPU_AFTER = 0.6


def test_cpu_spent_after_the_load_is_counted() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, str(CPU_AFTER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdin is not None and worker.stdout is not None
        before = cpu_seconds(worker.pid)
        assert before is not None
        worker.stdin.write("go\n")  # the load has "ended"; the work it left begins
        worker.stdin.flush()
        after, waited = settled_cpu_seconds(worker.pid)
        assert worker.stdout.readline() == "done\n"  # it was read only once the work was done
        assert after is not None
        assert after - before >= CPU_AFTER
        assert waited > 0
        # Quiet now: read at once, after one window.
        again, _ = settled_cpu_seconds(worker.pid)
        assert again is not None and again - after <= 0.05


def test_a_process_that_is_gone_reads_none() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert settled_cpu_seconds(gone.pid)[0] is None
