"""bench/gpu.py is the one script a lent GPU machine runs, with minutes to spare: its --smoke
run (the same code on a tiny CPU model, the compiled decode step traced by dynamo with the
eager backend instead of CUDA graphs) must finish with every section's figures and no error,
so a broken path is found here rather than on the device."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    g = res["graphed_rollout"]
    assert "compile_error" not in g, g
    assert g["same_tokens"] is True and g["graphed_tokens_per_s"] > 0
    assert all(p["tokens_per_s"] > 0 for p in res["pretrain"])
    assert res["rollout"]["ours_tokens_per_s"] > 0
    assert res["ppo"]["sec_per_iter_median"] > 0
