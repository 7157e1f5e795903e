"""A small run of bench/feedback_load.py: 10 clients x 20 rankings, steady and with the server
SIGKILLed and restarted midway (clients retry with the same submission ids)."""
from __future__ import annotations

import importlib.util

import pytest

from webapp_helpers import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("feedback_load", REPO / "bench" / "feedback_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_no_ranking_lost_or_doubled_across_a_killed_server(tmp_path):
    bench = load_bench()
    steady, kill = bench.run(clients=10, per_client=20, phases=("steady", "kill"), deadline_s=60, workdir=tmp_path)
    for r in (steady, kill):
        print(bench.report(r))
        assert r["errors"] == []
        assert (r["acknowledged"], r["exported"], r["lost"], r["doubled"], r["wrong_tiers"], r["acked_sid_missing"]) == \
            (200, 200, 0, 0, 0, 0)
        assert r["ok"]
    assert kill["killed_at_acked"] < 200 and kill["down_s"] > 0
    assert kill["retries"] > 0  # the clients really met a dead server and retried
