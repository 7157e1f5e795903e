"""--human: people rank in the browser. Binds the ranking app's port (a busy one is a one-line
error before anything waits), starts the app in a thread, prints its address and tokens, and
waits until the prompts are judged or an admin closes the round. The app (and uvicorn) are
imported lazily, only when people rank."""
from __future__ import annotations

import contextlib
import errno
import secrets
import select
import socket
import sys
import threading
import time
from pathlib import Path

from llmtrain.errors import ConfigError, LlmtrainError

APP_START_TIMEOUT = 30.0  # seconds the ranking app may take to come up before it is an error


def bind(port: int):
    """A listening socket on 127.0.0.1:port for the ranking app, or a one-line error naming
    feedback.port. Bound here, not inside uvicorn's thread, so a busy port never leaves the
    pipeline waiting for a server that is not there."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"feedback.port={port}: not a port number (0-65535; 0 takes any free port), e.g. feedback.port=8001")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped run's port is free again
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is in use by another program", errno.EACCES: "needs privileges to listen on"}.get(
            e.errno, f"cannot be listened on ({e.strerror})")
        other = 8001 if port != 8001 else 8002
        raise ConfigError(f"feedback.port={port}: port {port} on 127.0.0.1 {why}; choose another on the command line, "
                          f"e.g. feedback.port={other}") from None
    return sock


def start_app(db: Path, port: int, cleanup: contextlib.ExitStack) -> tuple[int, "threading.Thread"]:
    """Start the ranking app in a thread on its own socket; return the port it listens on and
    the thread (alive while the app serves).
    Stopped when `cleanup` closes (the end of the run). A server that does not come up is an
    error at once, never a wait."""
    import uvicorn

    from llmtrain.feedback.app import create_app

    sock = bind(port)
    cleanup.callback(sock.close)
    server = uvicorn.Server(uvicorn.Config(create_app(str(db)), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # uvicorn exits with SystemExit when it cannot start
            failed.append(e)

    thread = threading.Thread(target=serve, name="ranking-app", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    cleanup.callback(stop)
    deadline = time.monotonic() + APP_START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            why = f"{type(failed[0]).__name__}: {failed[0]}" if failed else f"not up after {APP_START_TIMEOUT:g} s"
            raise ConfigError(f"feedback.port={port}: the ranking app did not start ({why})")
        time.sleep(0.02)
    return sock.getsockname()[1], thread


def wait_for_people(cfg, r, store):
    """--human: start the ranking app, print its address and tokens, and return when every
    prompt has been judged by a person (ranked, all unacceptable or skipped: a skip leaves the
    prompt out), when an admin closes the round at /admin, or when Enter is pressed with at
    least one ranking. Says which prompts are still open whenever that changes."""
    # The round is closed only while this run goes on (pages then say it is over); a later
    # run, or `llmtrain feedback serve`, finds it open, with what was judged kept.
    r.cleanup.callback(store.reopen_round)  # registered first: runs after the app has stopped
    port, app = start_app(r.db, cfg.feedback.port, r.cleanup)  # a busy port: an error before anything is written
    store.reopen_round()
    tag = f"{int(time.time())}-{secrets.token_hex(2)}"  # a rerun within the same second makes new names too
    admin = store.add_annotator(f"admin-{tag}", is_admin=True)
    person = store.add_annotator(f"annotator-{tag}")
    total = len(store.prompt_ids())
    interactive = sys.stdin is not None and sys.stdin.isatty()
    print(f"\nThe ranking app is at http://127.0.0.1:{port}/\n  annotator token: {person}\n"
          f"  admin token:     {admin}\n(add more annotators with: llmtrain feedback add-annotator NAME --db {r.db})\n"
          f"Rank the {total} prompts (Skip leaves one out). The pipeline goes on when every prompt is judged by someone, "
          f"or when an admin closes the round at http://127.0.0.1:{port}/admin"
          + (", or press Enter to go on with what is ranked." if interactive else "."), flush=True)
    last = None
    while True:
        open_ids = store.open_prompts()
        closed = store.round_closed()
        people = [j for j in store.judgements() if not j["simulated"]]
        ranked = len({j["prompt_id"] for j in people if j["status"] == "ranked"})
        state = (tuple(open_ids), closed, ranked)
        if state != last:
            last = state
            judged = total - len(open_ids)
            print(f"rankings: {judged} of {total} prompts judged by people ({ranked} ranked)"
                  + (f"; {len(open_ids)} still open: " + ", ".join(f"#{i}" for i in open_ids[:20])
                     + (" …" if len(open_ids) > 20 else "") if open_ids else ""), flush=True)
        if closed:
            print("rankings: an admin closed the round; going on with what people ranked", flush=True)
            return
        if not open_ids:
            store.close_round()  # the page now says the round is over
            return
        if not app.is_alive():  # nobody can rank any more: say so rather than wait
            raise LlmtrainError(f"rankings: the ranking app on port {port} stopped; run the same command again to "
                                "reopen the round (what was judged is kept)")
        if not interactive:
            time.sleep(1.0)
        elif select.select([sys.stdin], [], [], 1.0)[0]:
            sys.stdin.readline()
            if ranked:
                store.close_round()
                return
            print("no rankings yet: rank at least one prompt first")
