"""Files on disk that are damaged, torn or half-written: one-line errors naming the file, never a
silent restart; metrics.jsonl survives a torn last line; report.md keeps model text as text."""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_pretrain_config
from llmtrain import checkpoint, files
from llmtrain.cli import main as cli_main
from llmtrain.errors import DataError, DiskFullError, LlmtrainError
from llmtrain.metrics import Metrics, parse_metrics, read_metrics
from llmtrain.stages import pretrain


def tree(root: Path) -> dict:
    """Every file under root with a hash of its bytes: to show that nothing was written."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def cli_args(cfg) -> list[str]:
    """The tiny pretrain config as command-line overrides."""
    args = [f"data.shards={cfg.data.shards}"]
    args += [f"model.{k}={v}" for k, v in vars(cfg.model).items() if v is not None]
    args += [f"optim.{k}={v}" for k, v in vars(cfg.optim).items()]
    args += [f"run.{k}={v}" for k, v in vars(cfg.run).items() if v is not None]
    return args


def one_line_error(err: str, command: str = "pretrain") -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llmtrain {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory) -> Path:
    """A tiny pretrain run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved") / "run"
    pretrain.main(tiny_pretrain_config(shards, out, max_steps=4, save_every=2, keep_last=0))
    return SavedRun(out, shards)


class SavedRun(type(Path())):
    """The run directory, knowing the shards it was trained on."""

    def __new__(cls, path, shards):
        self = super().__new__(cls, path)
        self.shards = shards
        return self


# ---------------------------------------------------------------- damaged meta.json (20 cases)

META_CASES = {
    "not-json": b"{",
    "empty": b"",
    "binary": b"\xff\xfe\x00\x01garbage",
    "list": b"[]",
    "null": b"null",
    "string": b'"step 4"',
    "empty-object": b"{}",
    "no-step": b'{"tokens": 0}',
    "no-tokens": b'{"step": 4}',
    "step-string": b'{"step": "4", "tokens": 0}',
    "step-negative": b'{"step": -1, "tokens": 0}',
    "step-bool": b'{"step": true, "tokens": 0}',
    "step-float": b'{"step": 4.0, "tokens": 0}',
    "step-inf": b'{"step": 1e999, "tokens": 0}',
    "step-null": b'{"step": null, "tokens": 0}',
    "step-wrong-folder": b'{"step": 3, "tokens": 0}',
    "tokens-string": b'{"step": 4, "tokens": "many"}',
    "data-list": b'{"step": 4, "tokens": 0, "data": []}',
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "truncated": b'{"step": 4, "tok',
}


def damage_and_resume(saved_run, tmp_path, capsys, name, content):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    target = run / "checkpoints" / "step_0000004" / name
    if content is None:
        target.unlink()
    elif content == "dir":
        target.unlink()
        target.mkdir()
    else:
        target.write_bytes(content)
    before = tree(run)
    capsys.readouterr()
    cfg = tiny_pretrain_config(Path(saved_run.shards), run, max_steps=6, save_every=2, resume=True)
    rc = cli_main(["pretrain", *cli_args(cfg)])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_line_error(err)
    assert str(target) in line, line
    assert tree(run) == before  # no restart from step 0: nothing written, nothing overwritten
    return line


@pytest.mark.parametrize("case", list(META_CASES))
def test_damaged_meta_json_is_one_line_error(saved_run, tmp_path, capsys, case):
    line = damage_and_resume(saved_run, tmp_path, capsys, "meta.json", META_CASES[case])
    assert "meta.json" in line


@pytest.mark.parametrize("case", ["missing", "dir"])
def test_meta_json_missing_or_a_folder(saved_run, tmp_path, capsys, case):
    damage_and_resume(saved_run, tmp_path, capsys, "meta.json", None if case == "missing" else "dir")


# ------------------------------------------------------------ damaged train_state.pt (12 cases)

def _pt(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _state_cases(saved_run) -> dict:
    good = (saved_run / "checkpoints" / "step_0000004" / "train_state.pt").read_bytes()
    return {
        "truncated-half": good[: len(good) // 2],
        "truncated-tail": good[:-30],
        "empty": b"",
        "garbage": os.urandom(4096),
        "json-text": b'{"optimizer": null}',
        "a-list": _pt([1, 2, 3]),
        "optimizer-string": _pt({"optimizer": "adam", "rng": None}),
        "optimizer-no-groups": _pt({"optimizer": {"state": {}, "param_groups": "x"}, "rng": None}),
        "optimizer-wrong-groups": _pt({"optimizer": {"state": {}, "param_groups": []}, "rng": None}),
        "rng-list": _pt({"optimizer": None, "rng": [1, 2]}),
        "rng-bad-torch-state": _pt({"optimizer": None, "rng": {"torch": "not a tensor"}}),
        "extra-string": _pt({"optimizer": None, "rng": None, "extra": "x"}),
    }


STATE_CASES = ["truncated-half", "truncated-tail", "empty", "garbage", "json-text", "a-list", "optimizer-string",
               "optimizer-no-groups", "optimizer-wrong-groups", "rng-list", "rng-bad-torch-state", "extra-string"]


@pytest.mark.parametrize("case", STATE_CASES)
def test_damaged_train_state_is_one_line_error(saved_run, tmp_path, capsys, case):
    line = damage_and_resume(saved_run, tmp_path, capsys, "train_state.pt", _state_cases(saved_run)[case])
    assert "train_state.pt" in line


def test_read_meta_of_a_good_checkpoint(saved_run):
    meta = checkpoint.read_meta(saved_run)
    assert meta["step"] == 4 and meta["tokens"] > 0


# ------------------------------------------------------------------- checkpoint folders

def _tiny_model():
    from llmtrain.config import ModelConfig
    from llmtrain.model import Transformer

    return Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, max_seq_len=16))


def test_resolve_skips_trash_and_tmp_and_save_clears_them(tmp_path):
    m = _tiny_model()
    checkpoint.save(tmp_path, 1, m, config={}, meta={"tokens": 0})
    root = tmp_path / "checkpoints"
    for name in (".trash-step_0000009", "step_0000009.tmp", "step_0000008.old"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"x")
    assert checkpoint.resolve(tmp_path).name == "step_0000001"
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_0000001"]
    checkpoint.save(tmp_path, 2, m, config={}, meta={"tokens": 0})
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]


def test_save_fsyncs_files_and_folder_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.saving, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    monkeypatch.setattr(files, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    monkeypatch.setattr(files, "fsync_dir", lambda p: events.append(("dir", Path(p).name)))
    monkeypatch.setattr(checkpoint.saving, "fsync_dir", lambda p: events.append(("dir", Path(p).name)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a).name)), real_replace(a, b)))
    checkpoint.save(tmp_path, 3, _tiny_model(), config={}, meta={"tokens": 0}, optimizer=None)
    rename = events.index(("rename", "step_0000003.tmp"))
    before = events[:rename]
    assert {("file", "model.safetensors"), ("file", "meta.json"), ("file", "config.json")} <= set(before)
    assert ("dir", "step_0000003.tmp") in before
    assert ("dir", "checkpoints") in events[rename:]  # the rename itself made durable


def test_keep_last_renames_to_trash_before_deleting(tmp_path, monkeypatch):
    m = _tiny_model()
    for s in (1, 2):
        checkpoint.save(tmp_path, s, m, config={}, meta={"tokens": 0})
    seen = []
    real_remove = checkpoint.saving.remove

    def spy(p):
        p = Path(p)
        if p.exists():
            seen.append(p.name)
        real_remove(p)

    monkeypatch.setattr(checkpoint.saving, "remove", spy)
    checkpoint.save(tmp_path, 3, m, config={}, meta={"tokens": 0}, keep_last=1)
    assert seen == [".trash-step_0000001", ".trash-step_0000002"]  # never a step folder itself
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003"]


@pytest.mark.parametrize("what", ["model.safetensors", "train_state.pt", "meta.json"])
def test_full_disk_during_save_names_the_file_and_removes_the_partial_folder(tmp_path, monkeypatch, what):
    m = _tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    checkpoint.save(tmp_path, 1, m, config={}, meta={"tokens": 0}, optimizer=opt)
    if what == "model.safetensors":  # safetensors' own words for ENOSPC
        def fail(sd, path, metadata=None):
            Path(path).write_bytes(b"\0" * 100)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(checkpoint.saving, "save_file", fail)
    elif what == "train_state.pt":  # torch.save names no cause: the free space tells
        def fail(obj, path):
            Path(path).write_bytes(b"PK\3\4" + b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", fail)
        monkeypatch.setattr(files, "free_bytes", lambda p: 0)
    else:
        real = Path.write_text

        def fail(self, text, *a, **k):
            if self.name == "meta.json":
                real(self, text[:5])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, text, *a, **k)
        monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(DiskFullError) as e:
        checkpoint.save(tmp_path, 2, m, config={}, meta={"tokens": 0}, optimizer=opt)
    msg = str(e.value)
    assert msg.startswith("no space left on device while writing ") and what in msg and "\n" not in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]


def test_other_save_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def fail(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", fail)  # plenty of free space: a real bug, raised as is
    m = _tiny_model()
    with pytest.raises(RuntimeError, match="enforce fail"):
        checkpoint.save(tmp_path, 1, m, config={}, meta={"tokens": 0}, optimizer=torch.optim.AdamW(m.parameters()))
    assert list((tmp_path / "checkpoints").iterdir()) == []


class _FailingFile:
    """A file whose write puts half the bytes on disk, then fails with `err` (as a full disk does)."""

    def __init__(self, path, mode, err):
        self.fh, self.err = open(path, mode), err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        raise self.err


@pytest.mark.parametrize("err, full", [(OSError(errno.ENOSPC, "No space left on device"), True),
                                       (OSError(errno.EIO, "Input/output error"), False)])
def test_write_file_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, err, full):
    """files.write_file (round.json, report.md, evaluation.json, rankings, metrics rewrites...): a
    write that fails leaves the file as it was and nothing beside it; a full disk is one line
    naming the file, another error is raised as it is."""
    target = tmp_path / "round.json"
    files.write_file(target, "old")
    monkeypatch.setattr(files, "open", lambda path, mode: _FailingFile(path, mode, err), raising=False)
    with pytest.raises(DiskFullError if full else OSError) as e:
        files.write_file(target, '{"new": "' + "x" * 1000 + '"}')
    if full:
        assert str(e.value) == f"no space left on device while writing {target}; it was left as it was"
    else:
        assert e.value is err
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["round.json"]
    monkeypatch.undo()
    files.write_file(target, b"new \xe2\x9c\x93")
    assert target.read_text(encoding="utf-8") == "new \u2713" and [p.name for p in tmp_path.iterdir()] == ["round.json"]


def test_disk_quota_counts_as_full():
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), "/nowhere/x")
    assert not files.is_disk_full(KeyboardInterrupt(), "/nowhere/x")
    assert issubclass(DiskFullError, LlmtrainError)


# ------------------------------------------------------------------------ metrics.jsonl

def _lines(*recs) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def test_torn_last_line_is_dropped_and_said(tmp_path):
    import io

    (tmp_path / "metrics.jsonl").write_bytes(_lines({"step": 1, "kind": "train"}, {"step": 2, "kind": "train"})
                                             + b'{"step": 3, "kind": "tr\xc3')  # cut inside a UTF-8 char
    out = io.StringIO()
    Metrics(tmp_path, resume_step=2, stream=out)
    assert "dropped a torn last line (24 bytes)" in out.getvalue() and "metrics.jsonl" in out.getvalue()
    assert (tmp_path / "metrics.jsonl").read_bytes() == _lines({"step": 1, "kind": "train"}, {"step": 2, "kind": "train"})


@pytest.mark.parametrize("bad", [b'{"step": 2, "ki', b"\xff\xfe", b"[1, 2]", b'{"step": "two"}', b"null"])
def test_bad_line_in_the_middle_names_file_and_line(tmp_path, bad):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(_lines({"step": 1}) + bad + b"\n" + _lines({"step": 3}))
    before = p.read_bytes()
    with pytest.raises(DataError, match=rf"metrics.jsonl:2: not a JSON record"):
        Metrics(tmp_path, resume_step=3, stream=open(os.devnull, "w"))
    with pytest.raises(DataError, match=r"metrics.jsonl:2: "):
        read_metrics(p)
    assert p.read_bytes() == before


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(_lines({"step": 1, "kind": "val", "loss": 1.0}) + b'{"step": 2, "kind": "val", "lo')
    assert read_metrics(p, "val") == [{"step": 1, "kind": "val", "loss": 1.0}]
    assert parse_metrics(p)[1] == len(b'{"step": 2, "kind": "val", "lo')


def test_full_disk_while_logging_cuts_the_partial_line(tmp_path, monkeypatch):
    import llmtrain.metrics as metrics_mod

    log = Metrics(tmp_path, stream=open(os.devnull, "w"))
    log.log(1, "train", loss=1.5)

    def half_then_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_mod, "_write_all", half_then_full)
    with pytest.raises(DiskFullError, match=r"^no space left on device while writing .*metrics.jsonl; "):
        log.log(2, "train", loss=1.25)
    recs, torn = parse_metrics(tmp_path / "metrics.jsonl")
    assert torn == 0 and [r["step"] for r in recs] == [1]
    assert (tmp_path / "metrics.jsonl").read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------ prepare

@pytest.mark.parametrize("value", ["0", "-1"])
def test_prepare_refuses_shard_tokens_not_positive(corpus_file, tokenizer_path, tmp_path, capsys, value):
    out = tmp_path / "data"
    rc = cli_main(["prepare", f"inputs=[{corpus_file}]", f"tokenizer={tokenizer_path}", f"out_dir={out}",
                   f"shard_tokens={value}"])
    line = one_line_error(capsys.readouterr().err, "prepare")
    assert rc == 2 and "shard_tokens" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- report.md

HOSTILE = ["<img src=x onerror=alert(1)>", "![x](http://evil/x.png)", "[click](javascript:alert(1))",
           "a | b | c", "`rm -rf /` and ``x``", "<script>alert(1)</script>", "**bold** _it_ ~~gone~~",
           "line one\nline two\r\n| --- |", "&lt;img src=x&gt;", "\\|", ""]


def test_report_md_escapes_model_text(tmp_path):
    from markdown_it import MarkdownIt

    from llmtrain.pipeline import Run
    from llmtrain.report import write_report

    r = Run(tmp_path)
    r.data.mkdir()
    (r.data / "meta.json").write_text(json.dumps({"vocab_size": 512}))
    samples = [{"prompt": h, "sft": h, "ppo": f"answer: {h}"} for h in HOSTILE]
    write_report(r, SimpleNamespace(name="t"), {"pretrain": 1.0}, samples)
    md = (tmp_path / "report.md").read_text()
    html = MarkdownIt("commonmark").enable("table").render(md)
    table = html[html.index("<h2>The same held-out prompts"):]
    for tag in ("<img", "<a ", "<script", "<code", "<strong", "<em", "<s>"):
        assert tag not in table, tag
    assert "<img" not in html.replace("<img src=\"plots/", "")  # the only images are the plots
    assert table.count("<tr>") == 1 + len(HOSTILE)  # header + one row a sample: no pipe split a row
    for row in table.split("<tr>")[2:]:
        assert row.count("<td>") == 3, row  # prompt, sft, ppo: no pipe made a column
    # the text itself survives, shown as written (html-escaped in the rendered page)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "![x](http://evil/x.png)" in html
    assert "[click](javascript:alert(1))" in html and "a | b | c" in html and "&amp;lt;img src=x&amp;gt;" in html
    assert "(empty)" in html


# ------------------------------------------- damaged run folders: one line before training

def _pretrain_into(saved_run, run, capsys, **r):
    cfg = tiny_pretrain_config(Path(saved_run.shards), run, max_steps=6, save_every=2, **r)
    capsys.readouterr()
    rc = cli_main(["pretrain", *cli_args(cfg)])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("resume", [True, False])
def test_checkpoints_a_file_is_one_line_error_before_training(saved_run, tmp_path, capsys, resume):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    before = tree(run)
    rc, out = _pretrain_into(saved_run, run, capsys, resume=resume)
    assert rc == 2, out.err
    line = one_line_error(out.err)
    assert f"{run / 'checkpoints'}: is not a folder" in line
    assert "step " not in out.out  # no training step ran, never a silent restart from step 0
    assert tree(run) == before  # nothing written (no metrics.jsonl, no .tmp)


@pytest.mark.parametrize("what", ["folder", "broken-link"])
def test_metrics_jsonl_not_a_file_is_one_line_error_before_training(saved_run, tmp_path, capsys, what):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    m = run / "metrics.jsonl"
    m.unlink()
    if what == "folder":
        m.mkdir()
        (m / "x").write_text("x")
    else:
        m.symlink_to(tmp_path / "nowhere")
    before = tree(run)
    rc, out = _pretrain_into(saved_run, run, capsys, resume=True)
    assert rc == 2, out.err
    line = one_line_error(out.err)
    assert f"{m}: is not a file" in line
    assert "step " not in out.out
    assert tree(run) == before


# --------------------------------- a checkpoint's config.json that does not describe its weights

CONFIG_CASES = {  # model key -> a value that is damage, not a model
    "max_seq_len-1e12": ("max_seq_len", 10**12, "beyond"),
    "max_seq_len-2^40": ("max_seq_len", 2**40, "beyond"),
    "dim-1e12": ("dim", 10**12, "beyond"),
    "vocab_size-1e12": ("vocab_size", 10**12, "beyond"),
    "n_layers-1e12": ("n_layers", 10**12, "beyond"),
    "n_heads-1e12": ("n_heads", 10**12, "beyond"),
    "ffn_dim-1e12": ("ffn_dim", 10**12, "beyond"),
    "dim-other": ("dim", 64, "model.embed_tokens.weight"),
    "vocab_size-other": ("vocab_size", 4096, "model.embed_tokens.weight"),
    "n_layers-more": ("n_layers", 40, "model.layers.N"),
    "n_layers-fewer": ("n_layers", 1, "model.layers.N"),
    "ffn_dim-other": ("ffn_dim", 256, "gate_proj"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_absurd_or_mismatched_config_json_is_one_line_error(saved_run, tmp_path, capsys, case, monkeypatch):
    key, value, said = CONFIG_CASES[case]
    ck = tmp_path / "ck"
    shutil.copytree(saved_run / "checkpoints" / "step_0000004", ck)
    conf = json.loads((ck / "config.json").read_text())
    conf["model"][key] = value
    (ck / "config.json").write_text(json.dumps(conf))
    before = tree(tmp_path)
    built = []
    import llmtrain.model as model_pkg
    real = model_pkg.Transformer.__init__
    monkeypatch.setattr(model_pkg.Transformer, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k)))
    capsys.readouterr()
    rc = cli_main(["generate", str(ck), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_line_error(err, "generate")
    assert str(ck / "config.json") in line and f"'model.{key}'" in line and said in line, line
    assert built == []  # refused before any model (and its allocation) is built
    assert tree(tmp_path) == before


def test_good_config_json_still_loads(saved_run):
    cfg = checkpoint.model_config(saved_run)
    assert (cfg.dim, cfg.n_layers) == (32, 2)


# ------------------------------- a kill between the two renames of a re-saved step loses nothing

def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("then", ["resolve", "next-save"])
def test_kill_between_the_renames_of_a_resave_keeps_a_complete_step(tmp_path, monkeypatch, then):
    m = _tiny_model()
    checkpoint.save(tmp_path, 1, m, config={"model": {}}, meta={"tokens": 0})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    new = {k: v.clone() for k, v in checkpoint.model_state(m).items()}
    real_replace = os.replace
    root = tmp_path / "checkpoints"

    class Killed(BaseException):
        pass

    def replace(a, b):
        if Path(b) == root / "step_0000001" and not Path(b).exists():  # the old copy is aside: die here
            raise Killed
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        checkpoint.save(tmp_path, 1, m, config={"model": {}}, meta={"tokens": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    if then == "resolve":
        d = checkpoint.resolve(tmp_path)
    else:  # the next save must not delete the only complete copies
        checkpoint.save(tmp_path, 2, m, config={"model": {}}, meta={"tokens": 2})
        d = checkpoint.step_dirs(tmp_path)[0]
    assert d == root / "step_0000001"
    assert checkpoint.read_meta(d)["tokens"] == 1  # the finished new save, complete
    got = _weights(d)
    assert got.keys() == new.keys() and all(torch.equal(got[k], new[k]) for k in new)
    left = sorted(p.name for p in root.iterdir())
    assert left == (["step_0000001"] if then == "resolve" else ["step_0000001", "step_0000002"]) or \
        left == [".trash-step_0000001", "step_0000001"]  # the old copy goes at the next save


def test_resave_killed_before_the_old_is_moved_keeps_the_old(tmp_path, monkeypatch):
    m = _tiny_model()
    checkpoint.save(tmp_path, 1, m, config={"model": {}}, meta={"tokens": 0})
    real_replace = os.replace
    root = tmp_path / "checkpoints"

    class Killed(BaseException):
        pass

    def replace(a, b):
        if Path(a) == root / "step_0000001":
            raise Killed
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        checkpoint.save(tmp_path, 1, m, config={"model": {}}, meta={"tokens": 1})
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_0000001"]  # one, never two
    assert checkpoint.read_meta(tmp_path)["tokens"] == 0
    checkpoint.save(tmp_path, 2, m, config={"model": {}}, meta={"tokens": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]


def test_publish_fsyncs_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(files, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    monkeypatch.setattr(files, "fsync_dir", lambda p: events.append(("dir", Path(p).name)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a).name)), real_replace(a, b)))
    (tmp_path / "f.tmp").write_text("x")
    files.publish(tmp_path / "f.tmp", tmp_path / "f")
    assert events == [("file", "f.tmp"), ("rename", "f.tmp"), ("dir", tmp_path.name)]
    assert (tmp_path / "f").read_text() == "x"
    events.clear()
    (tmp_path / "d.tmp").mkdir()
    (tmp_path / "d.tmp" / "a").write_text("a")
    files.publish(tmp_path / "d.tmp", tmp_path / "d")
    assert events == [("file", "a"), ("dir", "d.tmp"), ("rename", "d.tmp"), ("dir", tmp_path.name)]


@pytest.mark.parametrize("module", ["tokenizer", "feedback.export", "interop.hf_export", "data.chitchat", "pipeline.steps",
                                    "pipeline.rounds", "pipeline.run", "report.write", "metrics", "stages.evaluate"])
def test_writers_publish_through_the_fsyncing_helper(module):
    """Each module that writes an output file goes through files.publish or files.write_file (which
    publishes): no bare rename, and no plain write_text of an output."""
    import importlib
    import inspect

    src = inspect.getsource(importlib.import_module(f"llmtrain.{module}"))
    assert "publish(tmp" in src or "write_file(" in src
    assert "os.replace(tmp" not in src and ".rename(r.db)" not in src
    if module != "interop.hf_export":  # which writes its files into a temporary folder, then publishes the folder
        assert ".write_text(" not in src


def test_metrics_rewrite_fsyncs_the_folder(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(files, "fsync_dir", lambda p: events.append(Path(p)))
    Metrics(tmp_path, stream=open(os.devnull, "w"))
    assert events == [tmp_path]
