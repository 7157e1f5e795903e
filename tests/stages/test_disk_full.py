"""A full disk or a kill while writing files, then a resume (or rerun) that equals an uninterrupted
run bit for bit: during a checkpoint, a metrics write, pruning, and `prepare`."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_pretrain_config
from llmtrain import checkpoint, files
from llmtrain.cli import main as cli_main
from llmtrain.metrics import parse_metrics, read_metrics
from llmtrain.stages import pretrain

STEPS, EVERY = 6, 2


def cli_args(cfg) -> list[str]:
    args = [f"data.shards={cfg.data.shards}"]
    args += [f"model.{k}={v}" for k, v in vars(cfg.model).items() if v is not None]
    args += [f"optim.{k}={v}" for k, v in vars(cfg.optim).items()]
    args += [f"run.{k}={v}" for k, v in vars(cfg.run).items() if v is not None]
    return args


def run_args(shards, out, **run) -> list[str]:
    r = dict(max_steps=STEPS, save_every=EVERY, keep_last=0)
    r.update(run)
    return ["pretrain", *cli_args(tiny_pretrain_config(shards, out, **r))]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def assert_equals_uninterrupted(run_dir, full):
    a = load_file(str(checkpoint.resolve(full) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(run_dir) / "model.safetensors"))
    assert checkpoint.resolve(run_dir).name == f"step_{STEPS:07d}"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert losses(run_dir) == losses(full)  # one consistent run in metrics.jsonl, exact floats
    assert parse_metrics(Path(run_dir) / "metrics.jsonl")[1] == 0


def leftovers(run_dir) -> list[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if not checkpoint.STEP_RE.match(p.name)) if root.is_dir() else []


def one_line(err: str, command: str = "pretrain") -> str:
    """The one error line, apart from tqdm's progress bar ("prepare: 24.9k tok [...]")."""
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and not re.match(r"prepare: [\d.]+k? tok", l)]
    assert len(lines) == 1 and lines[0].startswith(f"llmtrain {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def full(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    pretrain.main(tiny_pretrain_config(shards, out, max_steps=STEPS, save_every=EVERY, keep_last=0))
    return out


def resume(shards, run_dir, capsys, **run) -> str:
    capsys.readouterr()
    assert cli_main(run_args(shards, run_dir, resume=True, **run)) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------ checkpoint

@pytest.mark.parametrize("what", ["train_state.pt", "model.safetensors"])
def test_full_disk_during_checkpoint_then_resume(shards, full, tmp_path, capsys, monkeypatch, what):
    run = tmp_path / "run"
    real_save, real_save_file = torch.save, checkpoint.saving.save_file

    def torch_save(obj, path, *a, **k):
        if str(path).endswith("step_0000004.tmp/train_state.pt"):
            Path(path).write_bytes(b"PK\3\4" + b"\0" * 4096)  # what a full disk lets through
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        return real_save(obj, path, *a, **k)

    def save_file(sd, path, *a, **k):
        if str(path).endswith("step_0000004.tmp/model.safetensors"):
            Path(path).write_bytes(b"\0" * 4096)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(sd, path, *a, **k)

    if what == "train_state.pt":
        monkeypatch.setattr(torch, "save", torch_save)
    else:
        monkeypatch.setattr(checkpoint.saving, "save_file", save_file)
    monkeypatch.setattr(files, "free_bytes", lambda p: 0)  # the disk is full right now
    capsys.readouterr()
    assert cli_main(run_args(shards, run)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"no space left on device while writing {run / 'checkpoints' / 'step_0000004.tmp' / what}" in line
    assert "removed" in line
    assert leftovers(run) == []  # the partial .tmp folder is gone: it does not keep the disk full
    assert [p.name for p in checkpoint.step_dirs(run)] == ["step_0000002"]
    monkeypatch.undo()  # space freed
    out = resume(shards, run, capsys)
    assert "resumed from" in out and "step 2" in out
    assert_equals_uninterrupted(run, full)


# --------------------------------------------------------------------------------- metrics

def test_full_disk_while_logging_metrics_then_resume(shards, full, tmp_path, capsys, monkeypatch):
    import llmtrain.metrics as metrics_mod

    run = tmp_path / "run"
    real = metrics_mod._write_all

    def write_all(fd, data):
        if b'"step": 5, "kind": "train"' in data:
            os.write(fd, data[: len(data) // 3])  # part of the line got through
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(metrics_mod, "_write_all", write_all)
    capsys.readouterr()
    assert cli_main(run_args(shards, run)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"no space left on device while writing {run / 'metrics.jsonl'}" in line
    recs, torn = parse_metrics(run / "metrics.jsonl")
    assert torn == 0 and max(r["step"] for r in recs) == 4  # the partial line was cut off
    monkeypatch.undo()
    resume(shards, run, capsys)
    assert_equals_uninterrupted(run, full)


def test_torn_metrics_line_from_a_kill_then_resume(shards, full, tmp_path, capsys, monkeypatch):
    import llmtrain.metrics as metrics_mod

    run = tmp_path / "run"
    real = metrics_mod._write_all

    def write_all(fd, data):
        if b'"step": 5, "kind": "train"' in data:
            os.write(fd, data[:20])
            raise SystemExit(137)  # killed mid-write: nothing cleans up
        real(fd, data)

    monkeypatch.setattr(metrics_mod, "_write_all", write_all)
    with pytest.raises(SystemExit):
        pretrain.main(tiny_pretrain_config(shards, run, max_steps=STEPS, save_every=EVERY, keep_last=0))
    assert parse_metrics(run / "metrics.jsonl")[1] == 20  # the torn line is there
    monkeypatch.undo()
    out = resume(shards, run, capsys)
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line (20 bytes)" in out
    assert_equals_uninterrupted(run, full)


def test_torn_metrics_line_in_the_middle_is_one_line_error(shards, full, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    lines = (run / "metrics.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1][:15]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli_main(run_args(shards, run, resume=True, max_steps=STEPS + 2)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{run / 'metrics.jsonl'}:2: not a JSON record" in line
    assert (run / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------------- pruning

KILL_MID_PRUNE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import llmtrain.checkpoint.saving as c
    real = c.remove

    def remove(p):
        p = Path(p)
        if p.name.startswith(".trash-") and p.exists():  # renamed away, deletion under way
            (p / "model.safetensors").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        real(p)

    c.remove = remove
    from llmtrain.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_pruning_then_resume(shards, full, tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KILL_MID_PRUNE, *run_args(shards, run, keep_last=1)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".trash-step_0000002", "step_0000004"]
    for d in checkpoint.step_dirs(run):  # no step folder without its weights
        assert (d / "model.safetensors").is_file() and (d / "train_state.pt").is_file()
    assert checkpoint.resolve(run).name == "step_0000004"
    out = resume(shards, run, capsys, keep_last=1)
    assert "step 4" in out
    assert sorted(p.name for p in root.iterdir()) == ["step_0000006"]  # stale trash removed at the next save
    assert_equals_uninterrupted(run, full)


# --------------------------------------------------------------------------------- prepare

def tree_bytes(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def prepare_args(corpus_file, tokenizer_path, out):
    return ["prepare", f"inputs=[{corpus_file}]", f"tokenizer={tokenizer_path}", f"out_dir={out}", "val_every=10",
            "shard_tokens=20000"]


@pytest.fixture(scope="module")
def prepared(corpus_file, tokenizer_path, tmp_path_factory) -> Path:
    """An uninterrupted prepare with several shards a split."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    assert cli_main(prepare_args(corpus_file, tokenizer_path, out)) == 0
    assert len(list(out.glob("train_*.bin"))) >= 3
    return out


class FullDiskFile:
    """A file on a disk that fills up after `room` bytes: the write that crosses it gets part of
    its bytes through, then ENOSPC."""
    room = 0

    def __init__(self, path, mode):
        self.fh = open(path, mode)

    def write(self, data):
        if len(data) > FullDiskFile.room:
            self.fh.write(data[:FullDiskFile.room])
            self.fh.flush()
            FullDiskFile.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        FullDiskFile.room -= len(data)
        return self.fh.write(data)

    def close(self):
        self.fh.close()


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_during_prepare_then_rerun(corpus_file, tokenizer_path, prepared, tmp_path, capsys, monkeypatch,
                                             existing):
    import llmtrain.data.pretrain as data_mod

    out = tmp_path / "data"
    if existing:  # an earlier output stays whole when the new one cannot be written
        shutil.copytree(prepared, out)
        (out / "marker").write_text("old")
    before = tree_bytes(out) if existing else None
    FullDiskFile.room = 50_000  # fills during the second train shard
    monkeypatch.setattr(data_mod, "open", FullDiskFile, raising=False)
    capsys.readouterr()
    assert cli_main(prepare_args(corpus_file, tokenizer_path, out)) == 2
    line = one_line(capsys.readouterr().err, "prepare")
    assert f"no space left on device while writing {tmp_path / f'data.tmp{os.getpid()}' / 'train_001.bin'}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data"] if existing else [])  # no temp folder left
    if existing:
        assert tree_bytes(out) == before
        shutil.rmtree(out)
    monkeypatch.undo()
    assert cli_main(prepare_args(corpus_file, tokenizer_path, out)) == 0
    assert tree_bytes(out) == tree_bytes(prepared)  # the rerun equals an uninterrupted prepare
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


KILL_PREPARE = textwrap.dedent("""
    import os, signal, sys
    import llmtrain.data.pretrain as P
    real = P.iter_documents
    P.ENCODE_BATCH = 4

    def docs(*a, **k):
        for i, d in enumerate(real(*a, **k)):
            if i == 40:  # of the 60 documents: shards written, not yet renamed
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            yield d

    P.iter_documents = docs
    from llmtrain.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_prepare_leaves_nothing_or_is_cleaned_by_the_next(corpus_file, tokenizer_path, prepared, tmp_path,
                                                                capsys, sig):
    out = tmp_path / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILL_PREPARE, sig, *prepare_args(corpus_file, tokenizer_path, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stderr_text = proc.communicate(timeout=300)[1]
    assert "Traceback" not in proc.stderr_text
    left = sorted(p.name for p in tmp_path.iterdir())
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert left == [f"data.tmp{proc.pid}"] and list((tmp_path / left[0]).glob("train_*.bin"))
    else:
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr_text[-2000:]
        assert left == []  # cleaned up by itself
    capsys.readouterr()
    assert cli_main(prepare_args(corpus_file, tokenizer_path, out)) == 0
    said = capsys.readouterr().out
    if sig == "SIGKILL":
        assert f"prepare: removed {tmp_path / left[0]}, the temp folder of an interrupted earlier run" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert tree_bytes(out) == tree_bytes(prepared)


# ------------------------------------------------------------------- a real full file system

REAL_DISK = textwrap.dedent("""
    set -u
    mount -t tmpfs -o size=1200k tmpfs "$DISK" || exit 99
    "$PY" -m llmtrain "$@" > "$OUT/out1" 2> "$OUT/err1"; echo $? > "$OUT/rc1"
    ls -a "$DISK/run/checkpoints" > "$OUT/ls1"
    mount -o remount,size=20m "$DISK"
    "$PY" -m llmtrain "$@" run.resume=true > "$OUT/out2" 2> "$OUT/err2"; echo $? > "$OUT/rc2"
    cp -r "$DISK/run" "$OUT/run"
""")


def test_real_full_tmpfs_during_checkpoint_then_resume(shards, full, tmp_path):
    """The same on a real 1.2 MB tmpfs (in a private mount namespace): torch.save's own error on
    a full disk. Needs `unshare` and permission to mount; elsewhere the injected cases above
    stand in for it."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(disk)],
                                                     capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs unshare and user namespaces)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DISK=str(disk), OUT=str(out), PY=sys.executable)
    args = run_args(shards, disk / "run")
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", REAL_DISK, "bash", *args], env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "rc1").read_text().strip() == "2", (out / "err1").read_text()
    line = one_line((out / "err1").read_text())
    assert f"no space left on device while writing {disk / 'run' / 'checkpoints' / 'step_0000004.tmp'}/" in line
    assert (out / "ls1").read_text().split() == [".", "..", "step_0000002"]  # the partial folder was removed
    assert (out / "rc2").read_text().strip() == "0", (out / "err2").read_text()
    assert "resumed from" in (out / "out2").read_text()
    assert_equals_uninterrupted(out / "run", full)


# ------------------------------------------- a kill between the two renames of a re-save or a swap

KILL_MID_SWAP = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    real = os.replace
    target = Path(sys.argv[1])

    def replace(a, b):
        if Path(b) == target and not target.exists():  # the old copy is aside, the new not yet in
            os._exit(9)
        return real(a, b)

    os.replace = replace
    from llmtrain.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_kill_between_the_renames_of_a_resaved_checkpoint_then_resume(shards, full, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(run_args(shards, run, max_steps=4)) == 0  # steps 2 and 4 exist
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    step4 = run / "checkpoints" / "step_0000004"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SWAP, str(step4), *run_args(shards, run)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]  # a fresh run over the old one, killed re-saving step 4
    assert checkpoint.resolve(run) == step4  # the new step 4 is whole and found, not lost
    out = resume(shards, run, capsys)
    assert f"resumed from {step4} at step 4" in out
    assert leftovers(run) == []
    assert_equals_uninterrupted(run, full)


def test_kill_between_the_renames_of_prepare_then_read_and_rerun(corpus_file, tokenizer_path, prepared, tmp_path,
                                                                 capsys):
    from llmtrain.data.pretrain import load_meta

    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    (out / "marker").write_text("old")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SWAP, str(out), *prepare_args(corpus_file, tokenizer_path, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert load_meta(out)["format"] == "llmtrain-shards-v1"  # a reader finds the whole new output
    assert tree_bytes(out) == tree_bytes(prepared)
    capsys.readouterr()
    assert cli_main(prepare_args(corpus_file, tokenizer_path, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the set-aside old output is cleaned up
    assert tree_bytes(out) == tree_bytes(prepared)
