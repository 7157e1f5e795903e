"""The ranking app's model worker: a process of its own that loads the chat models once and
answers chat requests one at a time, token by token.

    python -m llmtrain.feedback.modelworker --model NAME=CKPT [--model NAME=CKPT ...]

`modelserver.ModelServer` starts it (the app never imports this module: torch stays out of the
process that serves the ranking pages) and talks to it in JSON lines:

- stdin, from the app: {"op": "chat", "id", "model", "messages", "temperature", "top_p",
  "max_new_tokens"} (checked by the app already), and {"op": "stop", "id"};
- stdout, to the app: {"event": "ready", "models": {NAME: {"ctx": N}}} once the models are loaded,
  or {"event": "fatal", "error": one line} (then exit 2); per request {"id", "event": "start",
  "dropped", "cut", "room", "ctx"}, {"event": "token", "text"} as the text grows, and at the end one
  of {"event": "done", "text", "finished", "n_tokens"}, {"event": "stopped", "text", "n_tokens"}
  or {"event": "error", "error"}.

A stop is read by a thread of its own while the main thread generates, and checked after every
token: generation ends within one forward step. End of stdin (the app went away) stops the
answer under way and ends the worker. Tracebacks and anything else printed go to stderr (the
app's log); stdout carries the protocol only. The history is fitted to the context window as
the terminal chat fits it (`conversation.fit_history`), and text is decoded alike
(`conversation.StreamDecoder`: a token is shown once its UTF-8 character is whole).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

from llmtrain.conversation import StreamDecoder, fit_history, load_chat_model, seeded_generator
from llmtrain.errors import LlmtrainError
from llmtrain.feedback.modelserver import DELAY_ENV, parse_models
from llmtrain.generate import SamplingConfig, generate, prompt_budget


class Stopped(Exception):
    """Raised from the token callback: the app asked to stop this answer."""


class Worker:
    def __init__(self, models: dict, out, delay: float = 0.0):
        self.models = models  # name -> (tokenizer, model, generator)
        self.out = out
        self.delay = delay  # tests only (DELAY_ENV): seconds to wait after each token
        self.requests: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.waiting: set[str] = set()  # ids asked for and not yet answered
        self.stopped: set[str] = set()

    def emit(self, **event) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def read_requests(self, inp) -> None:
        """The reader thread: queue chat requests, mark stops; at end of input stop everything."""
        for line in inp:
            try:
                req = json.loads(line)
            except ValueError:
                continue
            op, jid = req.get("op"), req.get("id")
            with self.lock:
                if op == "chat":
                    self.waiting.add(jid)
                    self.requests.put(req)
                elif op == "stop" and jid in self.waiting:
                    self.stopped.add(jid)
        with self.lock:
            self.stopped |= self.waiting
        self.requests.put(None)

    def is_stopped(self, jid: str) -> bool:
        with self.lock:
            return jid in self.stopped

    def run(self) -> None:
        while (req := self.requests.get()) is not None:
            jid = req["id"]
            try:
                self.answer(req)
            except Exception as e:  # a bug or an out-of-memory: this answer fails, the worker goes on
                traceback.print_exc()
                self.emit(id=jid, event="error", error=f"the model failed on this request ({one_line(e)})")
            finally:
                with self.lock:
                    self.waiting.discard(jid)
                    self.stopped.discard(jid)

    def answer(self, req: dict) -> None:
        jid = req["id"]
        if self.is_stopped(jid):  # stopped while it waited
            self.emit(id=jid, event="stopped", text="", n_tokens=0)
            return
        tok, model, gen = self.models[req["model"]]
        max_new, ctx = req["max_new_tokens"], model.config.max_seq_len
        room = prompt_budget(ctx, max_new)
        fit = fit_history(tok, req["messages"], room)
        self.emit(id=jid, event="start", dropped=fit.dropped, cut=bool(fit.cut_from), room=room, ctx=ctx)
        sampling = SamplingConfig(max_new, req["temperature"], 0, req["top_p"], tok.stop_ids)
        decoder = StreamDecoder(tok, sampling.stop_ids)
        n = 0

        def on_token(step_ids):
            nonlocal n
            n += 1
            if new := decoder.push(step_ids[0]):
                self.emit(id=jid, event="token", text=new)
            if self.delay:
                time.sleep(self.delay)
            if self.is_stopped(jid):
                raise Stopped

        try:
            out = generate(model, [fit.ids], sampling, pad_id=tok.pad_id, generator=gen, on_token=on_token)[0]
        except Stopped:
            out = None
        if rest := decoder.rest():
            self.emit(id=jid, event="token", text=rest)
        if out is None:
            self.emit(id=jid, event="stopped", text=decoder.text, n_tokens=n)
        else:
            self.emit(id=jid, event="done", text=decoder.text, finished=bool(out) and out[-1] in sampling.stop_ids,
                      n_tokens=len(out))


def one_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def load(models: dict[str, str], device: str = "auto") -> dict:
    """name -> (tokenizer, model, generator); a checkpoint that does not load is a LlmtrainError
    naming its --model."""
    loaded = {}
    for name, ckpt in models.items():
        try:
            tok, model = load_chat_model(ckpt, device)
        except (LlmtrainError, OSError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if isinstance(e, LlmtrainError) else one_line(e)
            raise LlmtrainError(f"--model {name}={ckpt}: {why}") from None
        loaded[name] = (tok, model, seeded_generator(model, 0))
    return loaded


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the ranking app's model worker (started by the app)")
    ap.add_argument("--model", action="append", default=[])
    a = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the protocol; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C stops the app, which then closes our stdin
    try:
        os.nice(5)  # the ranking pages come first on a busy CPU
    except (AttributeError, OSError):
        pass
    try:
        models = load(parse_models(a.model))
    except LlmtrainError as e:
        out.write(json.dumps({"event": "fatal", "error": str(e)}) + "\n")
        out.flush()
        sys.exit(2)
    worker = Worker(models, out, float(os.environ.get(DELAY_ENV) or 0))
    worker.emit(event="ready", models={n: {"ctx": m.config.max_seq_len} for n, (_, m, _) in models.items()})
    threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,), daemon=True).start()
    worker.run()


if __name__ == "__main__":
    main()
