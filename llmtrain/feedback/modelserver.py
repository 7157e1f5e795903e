"""The ranking app's side of its chat models: the model worker process and the answers under way.

`ModelServer` starts `python -m llmtrain.feedback.modelworker` (a process of its own that loads
the checkpoints once; see that module for the protocol) and talks to it through pipes: a writer
thread sends requests, a reader thread hands each event to the asyncio queue of its answer
(`loop.call_soon_threadsafe`), so the event loop never waits on the worker and torch never
enters the app's process. At most `max_jobs` answers run or wait at once (more: `Busy`, which
the app answers with 503 and Retry-After). If the worker dies, each answer under way gets an
"error" event with one line, and the next request starts a fresh worker.

Imports only the stdlib, anyio (Starlette's own: the arena's answers from its threadpool),
llmtrain.errors and the arena's name rule (never torch).
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import anyio.from_thread

from llmtrain.errors import ConfigError
from llmtrain.feedback.arena_store import check_model_name

MAX_JOBS = 4  # answers running or waiting at once (the worker answers one at a time)
READY_TIMEOUT = 600.0  # seconds the worker may take to load the models
END = ("done", "stopped", "error")  # the events that end an answer
DELAY_ENV = "LLMTRAIN_CHAT_TOKEN_DELAY"  # tests only: seconds the worker waits after each token
ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the llmtrain package
ARENA_MAX_NEW_TOKENS = 48  # an arena answer to a person's own prompt (arena-generate's default)
ARENA_OWNER = -1  # the owner of the arena's answers in the job table: no annotator can stop them


def name_checkpoint_pairs(values: list[str], flag: str, check_name) -> list[tuple[str, str]]:
    """`NAME=CKPT` values -> [(name, checkpoint)] in order: a ConfigError naming the flag and value
    for a malformed one, a name `check_name` refuses (it raises ValueError with the reason), or a
    name given twice. Shared by `feedback serve --model` and `feedback arena-generate --model`."""
    pairs: list[tuple[str, str]] = []
    for v in values:
        name, sep, ckpt = v.partition("=")
        if not sep or not name or not ckpt:
            raise ConfigError(f"{flag} {v}: give NAME=CHECKPOINT (e.g. {flag} sft=runs/sft)")
        try:
            check_name(name)
        except ValueError as e:
            raise ConfigError(f"{flag} {v}: {e}") from None
        if name in (n for n, _ in pairs):
            raise ConfigError(f"{flag} {v}: the name {name} is given twice (each model needs a name of its own)")
        pairs.append((name, ckpt))
    return pairs


def parse_models(values: list[str], flag: str = "--model") -> dict[str, str]:
    """`--model NAME=CKPT` values -> {name: checkpoint} (name_checkpoint_pairs), each checkpoint
    path existing (what is inside a checkpoint is checked by the worker as it loads it, before the
    app starts)."""
    models = dict(name_checkpoint_pairs(values, flag, check_model_name))
    for name, ckpt in models.items():
        if not os.path.exists(ckpt):
            raise ConfigError(f"{flag} {name}={ckpt}: checkpoint not found: {ckpt}")
    return models


class Busy(Exception):
    """As many answers as allowed are running or waiting."""


class WorkerDown(Exception):
    """The worker is not running and could not be started again (one line)."""


class Job:
    """One answer under way: its id, the annotator who asked, and the queue of its events."""

    def __init__(self, owner: int, loop: asyncio.AbstractEventLoop, ahead: int):
        self.id = secrets.token_urlsafe(12)
        self.owner, self.loop, self.ahead = owner, loop, ahead
        self.events: asyncio.Queue = asyncio.Queue()

    def deliver(self, event: dict) -> None:
        """From the reader thread: the event into the queue, on the loop's thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (the app is shutting down)
            pass


class ModelServer:
    def __init__(self, models: dict[str, str], max_jobs: int = MAX_JOBS):
        self.models, self.max_jobs = dict(models), max_jobs
        self.info: dict[str, dict] = {}  # name -> {"ctx": context window}, from the worker
        self.lock = threading.Lock()
        self.start_lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.proc: subprocess.Popen | None = None
        self.outbox: queue.Queue = queue.Queue()
        self.closed = False

    # ---- the worker process

    def start(self, timeout: float = READY_TIMEOUT) -> "ModelServer":
        """Start the worker and wait until it has loaded every model; a ConfigError (one line)
        when a checkpoint does not load or the worker exits first."""
        cmd = [sys.executable, "-m", "llmtrain.feedback.modelworker", *(f"--model={n}={c}" for n, c in self.models.items())]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready: dict = {}
        started = threading.Event()
        threading.Thread(target=self._read, args=(proc, ready, started), daemon=True, name="model-reader").start()
        if not started.wait(timeout):
            proc.kill()
            raise ConfigError(f"--model: the models did not load within {timeout:g} s")
        if ready.get("event") != "ready":
            proc.wait()
            raise ConfigError(ready.get("error") or f"--model: the model worker exited (status {proc.returncode}) "
                                                    "before loading the models (its messages are above)")
        outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._write, args=(proc, outbox), daemon=True, name="model-writer").start()
        with self.lock:
            self.proc, self.outbox, self.info = proc, outbox, ready["models"]
        return self

    def alive(self) -> bool:
        with self.lock:
            return self.proc is not None and self.proc.poll() is None

    def ensure_started(self) -> None:
        """A fresh worker when the last one died (in a thread: loading takes seconds)."""
        with self.start_lock:
            if self.alive() or self.closed:
                return
            try:
                self.start()
            except ConfigError as e:
                raise WorkerDown(f"the model worker could not be restarted: {e}") from None

    def close(self) -> None:
        """End the worker: its stdin closes (it stops the answer under way and exits)."""
        self.closed = True
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        self.outbox.put(None)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _write(self, proc: subprocess.Popen, outbox: queue.Queue) -> None:
        while (msg := outbox.get()) is not None:
            try:
                proc.stdin.write(msg)
                proc.stdin.flush()
            except (OSError, ValueError):  # the worker died: the reader reports it
                return
        try:
            proc.stdin.close()
        except OSError:
            pass

    def _read(self, proc: subprocess.Popen, ready: dict, started: threading.Event) -> None:
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") in ("ready", "fatal"):
                ready.update(ev)
                started.set()
                continue
            with self.lock:
                job = self.jobs.get(ev.get("id"))
                if job is not None and ev.get("event") in END:
                    del self.jobs[job.id]
            if job is not None:
                job.deliver(ev)
        code = proc.wait()
        started.set()
        self._died(proc, code)

    def _died(self, proc: subprocess.Popen, code: int) -> None:
        with self.lock:
            if self.proc is not proc:  # closed, or never became the running worker
                return
            self.proc = None
            jobs, self.jobs = list(self.jobs.values()), {}
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        for job in jobs:
            job.deliver({"event": "error", "error": f"the model worker stopped ({why}); send again to restart it"})

    # ---- answers

    async def submit(self, owner: int, request: dict) -> Job:
        """Queue a chat request ({"model", "messages", "temperature", "top_p", "max_new_tokens"},
        checked already) -> its Job. Raises Busy, or WorkerDown."""
        if not self.alive():
            await asyncio.to_thread(self.ensure_started)
        with self.lock:
            if len(self.jobs) >= self.max_jobs:
                raise Busy()
            if self.proc is None:
                raise WorkerDown("the model worker is not running")
            job = Job(owner, asyncio.get_running_loop(), len(self.jobs))
            self.jobs[job.id] = job
            outbox = self.outbox
        outbox.put((json.dumps({"op": "chat", "id": job.id, **request}) + "\n").encode())
        return job

    def stop(self, job_id: str, owner: int) -> bool:
        """Ask the worker to stop an answer of `owner`'s (False: no such answer under way)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.owner != owner:
                return False
            outbox = self.outbox
        outbox.put((json.dumps({"op": "stop", "id": job_id}) + "\n").encode())
        return True


class ServedArenaWorker:
    """The arena's answers to a person's own prompt (arena_api.ArenaWorker), from the chat's model
    worker: each arena model is answered by the served model of the same name (`feedback serve
    --model NAME=CKPT` with the names `arena-generate` was given), greedily as `arena-generate`
    answers by default. Called from one of the app's worker threads: each answer is queued on the
    event loop (anyio.from_thread) like a chat request, so it shares the worker's queue and cap. A
    model that is not served, or an answer that fails, is left out: the arena then names it."""

    def __init__(self, server: ModelServer, max_new_tokens: int = ARENA_MAX_NEW_TOKENS):
        self.server, self.max_new_tokens = server, max_new_tokens

    def answer(self, models: list[dict], messages: list[dict]) -> dict[str, dict]:
        out = {}
        for m in models:
            if m["name"] in self.server.models:
                got = anyio.from_thread.run(self._answer, m["name"], messages)
                if got is not None:
                    out[m["name"]] = got
        return out

    async def _answer(self, name: str, messages: list[dict]) -> dict | None:
        request = {"model": name, "messages": messages, "temperature": 0.0, "top_p": 1.0,
                   "max_new_tokens": self.max_new_tokens}
        try:
            job = await self.server.submit(ARENA_OWNER, request)
        except (Busy, WorkerDown):
            return None
        while True:
            ev = await job.events.get()
            if ev.get("event") == "done":
                return {"text": ev["text"], "finished": bool(ev.get("finished")), "n_tokens": int(ev.get("n_tokens", 0))}
            if ev.get("event") in END:
                return None
