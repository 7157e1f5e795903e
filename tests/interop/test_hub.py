"""Hub ids and Hugging Face folders wherever a checkpoint is taken (issue #17, Build 1), tested
offline: the cache is laid out as huggingface_hub lays it out (models--org--name/ with blobs/,
snapshots/<commit>/ of links into blobs/, refs/<branch> holding the commit), and every lookup
runs in a fresh process with HF_HUB_OFFLINE=1 and HF_HOME pointing at it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf import load_ours, make_hf_model

from llmtrain.errors import CheckpointError
from llmtrain.interop.hub import is_hf_folder, is_ours, parse_hub_id, resolve_model

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hf_home: Path, repo: str, src: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Put the files of `src` into an HF hub cache as `repo` at `commit`; -> the snapshot folder."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snap


def offline(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf-llama")
    model = make_hf_model(src, "llama-gqa")
    return src, model


def test_hub_id_resolves_from_the_offline_cache_and_imports_once(hf_model, tmp_path):
    src, hf = hf_model
    cache_model(tmp_path / "hf", "tiny-org/tiny-llama", src)
    run = tmp_path / "run"
    code = ("from llmtrain.interop.hub import resolve_model\n"
            f"print('PATH', resolve_model('tiny-org/tiny-llama', {str(run)!r}, key='init_from'))")
    first = offline(code, tmp_path / "hf")
    assert first.returncode == 0, first.stderr
    assert "init_from: importing the Hugging Face model tiny-org/tiny-llama" in first.stdout
    out = Path(first.stdout.split("PATH ")[1].strip())
    assert out == run / "imported" / "tiny-org--tiny-llama"
    # The imported weights are the cached model's: same logits as transformers on the same ids.
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        hf_logits = hf(ids).logits  # ours has rows for our added special tokens after the source vocabulary
        torch.testing.assert_close(load_ours(out)(ids)[..., :hf_logits.shape[-1]], hf_logits, rtol=1e-5, atol=1e-5)
    again = offline(code, tmp_path / "hf")
    assert again.returncode == 0, again.stderr
    assert "was imported before" in again.stdout and "importing" not in again.stdout


def test_revision_by_commit_and_a_missing_revision(hf_model, tmp_path):
    src, _ = hf_model
    cache_model(tmp_path / "hf", "tiny-org/tiny-llama", src)
    ok = offline("from llmtrain.interop.hub import download\n"
                 f"print(download('tiny-org/tiny-llama@{COMMIT}'))", tmp_path / "hf")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(f"snapshots/{COMMIT}")
    bad = offline("from llmtrain.interop.hub import download\n"
                  "from llmtrain.errors import CheckpointError\n"
                  "try:\n    download('tiny-org/tiny-llama@v9', key='policy')\n"
                  "except CheckpointError as e:\n    print('ERR', e)", tmp_path / "hf")
    assert bad.returncode == 0, bad.stderr
    line = bad.stdout.strip()
    assert line.startswith("ERR policy: tiny-org/tiny-llama@v9:") and "\n" not in line


def test_an_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    r = offline("from llmtrain.interop.hub import resolve_model\n"
                "from llmtrain.errors import CheckpointError\n"
                f"try:\n    resolve_model('nobody/nothing', {str(tmp_path / 'run')!r}, key='init_from')\n"
                "except CheckpointError as e:\n    print('ERR', e)", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("ERR init_from: nobody/nothing: no such folder here, and not in the Hugging Face "
                                "cache while the Hub cannot be reached (HF_HUB_OFFLINE=1, or no network)")
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_hf_folder_is_imported_into_the_run_and_ours_is_used_as_is(hf_model, tmp_path):
    src, _ = hf_model
    said = []
    out = resolve_model(str(src), tmp_path / "run", key="policy", log=said.append)
    assert out == tmp_path / "run" / "imported" / src.name
    assert is_ours(out) and not is_hf_folder(out / "checkpoints")
    assert said and said[0].startswith("policy: importing the Hugging Face model")
    assert resolve_model(str(out), tmp_path / "other", log=said.append) == out  # ours: as it is
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("spec", ["../../etc/passwd", "/nonexistent/folder", "org/", "a/b/c", "org/name@",
                                  "org/na me", "-org/name", "org/..", "x" * 300 + "/y"])
def test_what_is_neither_a_checkpoint_nor_a_hub_id_is_one_line(spec, tmp_path):
    assert parse_hub_id(spec) is None
    with pytest.raises(CheckpointError) as e:
        resolve_model(spec, tmp_path / "run", key="init_from")
    assert str(e.value).startswith("init_from: ") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_neither_is_named(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="junk"):
        resolve_model(str(d), tmp_path / "run", key="init_from")


def test_hub_ids_parse():
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct@main") == ("Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")


def test_cli_import_takes_a_hub_id_and_a_stage_imports_on_the_fly(hf_model, tmp_path):
    """`llmtrain import org/name -o DIR` through the offline cache; `llmtrain sft init_from=org/name`
    imports it into its run folder, says so, and trains from it."""
    src, _ = hf_model
    cache_model(tmp_path / "hf", "tiny-org/tiny-llama", src)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "llmtrain", "import", "tiny-org/tiny-llama", "-o", str(tmp_path / "imp")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"snapshots/{COMMIT}" in r.stdout and is_ours(tmp_path / "imp")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"I say {i}."}) + "\n" for i in range(20)))
    r = subprocess.run([sys.executable, "-m", "llmtrain", "sft", "init_from=tiny-org/tiny-llama", f"data.train={data}",
                        f"run.out_dir={tmp_path / 'sft'}", "run.max_steps=1", "run.batch_size=2", "sample_prompts=0",
                        "run.threads=1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "init_from: importing the Hugging Face model tiny-org/tiny-llama" in r.stdout
    assert is_ours(tmp_path / "sft" / "imported" / "tiny-org--tiny-llama") and is_ours(tmp_path / "sft")
    bad = subprocess.run([sys.executable, "-m", "llmtrain", "sft", "init_from=tiny-org/missing", f"data.train={data}",
                          f"run.out_dir={tmp_path / 'sft2'}"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("llmtrain sft: error: init_from: tiny-org/missing: no such folder here")
