"""dist.keep_freed_memory: glibc keeps the pages a training step frees for the next step."""
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtrain import dist
from llmtrain.errors import ConfigError

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Six rounds of forty 4 MB blocks, written and freed, as a training step's activations are,
# and each round's page faults. glibc's defaults raise the mmap threshold to 4 MB and the trim
# threshold to 8 MB at the first free, then serve the blocks from a heap whose free top goes
# back to the kernel: on this pattern they refault every page in some runs and settle after a
# few rounds in others (the layout decides). Kept, nothing goes back: rounds 3 to 6 fault
# nothing. (A bf16 step of nanoGPT's shape: 55,000 faults with the defaults, 2 kept; bench/pretrain.py.)
ROUNDS = textwrap.dedent("""
    import resource
    import torch
    from llmtrain import dist
    took = dist.keep_freed_memory()
    n = 1 << 20  # 4 MB of fp32
    faults = []
    for r in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(n).fill_(1.0) for _ in range(40)]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(took, *faults)
""")


def rounds(env: dict) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", [int(f) for f in out[1:]]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only: elsewhere keep_freed_memory changes nothing")
def test_kept_memory_is_reused_without_page_faults():
    took, faults = rounds({"LLMTRAIN_MALLOC": ""})
    assert took  # glibc took both settings
    pages = 40 * (4 << 20) // 4096
    assert faults[0] > 0  # the first round writes fresh pages: the count sees them (fewer with huge pages)
    assert sum(faults[2:]) < 0.05 * pages, f"rounds 3-6 faulted {faults[2:]} pages of {pages} kept"


RELEASE = textwrap.dedent("""
    import torch
    from llmtrain import dist
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    took = dist.keep_freed_memory()
    blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(50)]  # 200 MB
    del blocks
    kept = rss()
    dist.release_freed_memory()
    print(took, kept - rss())
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_release_hands_the_kept_memory_back():
    """What a stage kept goes back to the kernel when the pipeline's stage ends."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) > 150 << 20, out


def test_a_misspelt_choice_is_refused_on_any_device(monkeypatch):
    """On a GPU too (where malloc is left alone), not only on a CPU."""
    import torch

    monkeypatch.setenv("LLMTRAIN_MALLOC", "Keep")
    monkeypatch.setattr(dist, "pick_device", lambda pref, rank=0: torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="LLMTRAIN_MALLOC='Keep'"):
        dist.setup("cuda")


def test_setup_keeps_freed_memory_on_a_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "keep_freed_memory", lambda: calls.append(1) or True)
    env = dist.setup("cpu")
    assert env.device.type == "cpu" and calls == [1]


def test_system_malloc_is_left_alone(monkeypatch):
    monkeypatch.setenv("LLMTRAIN_MALLOC", "system")
    assert dist.keep_freed_memory() is False


def test_a_misspelt_malloc_choice_is_one_line(tmp_path):
    """LLMTRAIN_MALLOC=sytem is refused before the stage starts, in one line naming the variable."""
    r = subprocess.run([sys.executable, "-m", "llmtrain", "pretrain", "-c", "configs/pretrain-tiny.yaml",
                        f"run.out_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                       env={**os.environ, "LLMTRAIN_MALLOC": "sytem"}, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "LLMTRAIN_MALLOC='sytem'" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
