"""Helpers of the ranking-app tests: a live uvicorn server and a Chromium fixture.

Not a conftest.py on purpose: tests/conftest.py is imported as the module `conftest` by other
tests (`from conftest import WORDS`), and a second conftest.py here would take that name.
Test modules import the `chromium` fixture from here.

Browser tests are marked `browser` (run only them: pytest -m browser; leave them out:
-m 'not browser'). They drive Debian's Chromium at /usr/bin/chromium (apt-get install chromium);
Playwright's own browser download does not work here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m llmtrain.feedback.app` under uvicorn on 127.0.0.1, in a subprocess. `args`: more
    flags (e.g. --model NAME=CKPT); `env`: more environment variables."""

    def __init__(self, db: Path, log: Path, args: tuple = (), env: dict | None = None):
        self.db, self.log, self.args, self.env = db, log, [str(a) for a in args], env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 30.0) -> "LiveServer":
        import httpx

        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmtrain.feedback.app", "--db", str(self.db),
                                          "--port", str(self.port), "--log-level", "warning", *self.args],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/login", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def login(page, server, token: str, next_: str = "/") -> None:
    """Sign in through the login form in a Playwright page, landing on next_."""
    page.goto(f"{server.url}/login?next={urllib.parse.quote(next_)}")
    page.fill("#token", token)
    page.click("form button[type=submit]")
    page.wait_for_url(server.url + next_)


def wait_prompt(page, pid: int) -> None:
    """Until the ranking page shows prompt `pid` and its answers."""
    page.wait_for_function("id => document.getElementById('prompt-id').textContent === '#' + id", arg=pid)
    page.locator("#cands > .card").first.wait_for()


def tiny_checkpoint(tokenizer_path: Path, out: Path, max_seq_len: int = 256) -> Path:
    """A 1-layer, 32-wide model with random weights saved as a checkpoint (a run directory):
    it loads in a blink and writes a token in a millisecond (the chat tests)."""
    import torch

    from llmtrain import checkpoint
    from llmtrain.config import ModelConfig
    from llmtrain.model import Transformer
    from llmtrain.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_path)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=max_seq_len))
    checkpoint.save(out, 1, model, config={"model": vars(model.config), "stage": "sft"}, meta={"tokens": 0},
                    tokenizer_path=str(tokenizer_path))
    return out


def worker_pids(server_pid: int) -> list[int]:
    """The model worker processes the app server started: its children running modelworker (Linux)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == server_pid and b"modelworker" in d.joinpath("cmdline").read_bytes():
                pids.append(int(d.name))
        except (OSError, ValueError, IndexError):  # not a process, or it ended meanwhile
            continue
    return pids


_SHARED: dict = {"users": 0}


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the session (the `browser` tests skip where it is absent).
    Every test module that imports this fixture gets its own fixture to pytest, so the one
    Playwright is shared here: a second one in the same thread would refuse to start."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's Chromium at {CHROMIUM} (apt-get install -y chromium; CI installs it)")
    if not _SHARED["users"]:
        from playwright.sync_api import sync_playwright

        _SHARED["pw"] = sync_playwright().start()
        _SHARED["browser"] = _SHARED["pw"].chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    _SHARED["users"] += 1
    try:
        yield _SHARED["browser"]
    finally:
        _SHARED["users"] -= 1
        if not _SHARED["users"]:
            _SHARED.pop("browser").close()
            _SHARED.pop("pw").stop()
