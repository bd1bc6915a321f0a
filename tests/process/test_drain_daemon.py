"""A real daemon drained under real clients delivers every reply it counted (issue 10, item 1).

Runs benchmarks/drain_delivery.py, which starts ``connserver serve echo`` as a
process, streams from slow-reading clients, sends SIGTERM and compares what
each client received with the daemon's access log.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "drain_delivery.py"


def test_sigterm_under_load_loses_no_reply(tmp_path):
    """4 streaming, slow-reading clients, SIGTERM after 1 s: every byte the access log
    counts as sent arrives, each stream ends with EOF, the daemon drains and exits 0."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--clients", "4", "--warmup", "1",
                             "--graceful-timeout", "5", "--json"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["clients_short"] == 0 and summary["clients_log_overstates"] == 0, summary
    assert summary["received_total"] == summary["bytes_out_total"] > 0, summary
    assert summary["ends"] == {"eof": 4} and summary["clients_not_prefix"] == 0, summary
    assert (summary["drained"], summary["forced"], summary["daemon_exit_code"]) == (4, 0, 0)
