"""Load test of the ranking app on 127.0.0.1: many annotators submitting at once, and a server
killed (SIGKILL) and restarted midway while they keep going.

    python bench/feedback_load.py                      # 50 clients x 200 rankings, both phases
    python bench/feedback_load.py --clients 10 --per-client 20 --phases kill

Each phase makes a fresh database (>= per-client prompts, K=4 dummy candidates, one annotator
with a bearer token per client), starts `python -m llmtrain.feedback.app` under uvicorn, and
runs the clients (asyncio + httpx, one connection each) the way the page does: GET /api/next,
then POST /api/submit with a client-made submission_id. A connection error or 5xx is retried
with the SAME submission_id. Then it exports rankings.jsonl and checks: exactly clients x
per-client lines, none doubled, and every acknowledged ranking is there with the tiers sent.

Bounded: every loop has a count and the phase a deadline; traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtrain.feedback.store import FeedbackStore  # noqa: E402

K = 4
MAX_ATTEMPTS = 200  # per request
# connect refused/reset, half-read responses, timeouts: the server went away; retry the same request
RETRY_ERRORS = (httpx.TransportError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError)


class RawClient:
    """A minimal HTTP/1.1 keep-alive JSON client on asyncio streams. httpx costs ~3 ms of CPU per
    request, twice what the server spends, and shares the same 2 cores: the bench would measure
    httpx. This one reconnects after any error; `--client httpx` uses httpx instead."""

    def __init__(self, port: int, token: str, timeout: float = 15.0):
        self.port, self.timeout = port, timeout
        self.auth = f"Authorization: Bearer {token}\r\n"
        self.reader = self.writer = None

    async def _connect(self):
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2.0)

    def _drop(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, url: str, json_body=None) -> tuple[int, bytes]:
        try:
            if self.writer is None:
                await self._connect()
            body = json.dumps(json_body).encode() if json_body is not None else b""
            head = (f"{method} {url} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{self.auth}"
                    + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if json_body is not None else "")
                    + "\r\n")
            self.writer.write(head.encode() + body)
            return await asyncio.wait_for(self._response(), self.timeout)
        except BaseException:
            self._drop()
            raise

    async def _response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self._drop()
        return status, body

    async def aclose(self):
        self._drop()


class HttpxClient:
    def __init__(self, port: int, token: str, timeout: float = 15.0):
        self.c = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(timeout, connect=2.0),
                                   headers={"Authorization": f"Bearer {token}"})

    async def request(self, method: str, url: str, json_body=None) -> tuple[int, bytes]:
        r = await self.c.request(method, url, json=json_body)
        return r.status_code, r.content

    async def aclose(self):
        await self.c.aclose()


CLIENTS = {"raw": RawClient, "httpx": HttpxClient}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_db(path: Path, n_prompts: int, n_clients: int) -> list[str]:
    store = FeedbackStore(path)
    for p in range(n_prompts):
        store.add_prompt(f"load-test prompt {p}: say something about the number {p}",
                         [{"text": f"candidate {i} for prompt {p} " + "lorem ipsum " * (i + 1), "n_tokens": 8 * (i + 1)}
                          for i in range(K)])
    tokens = [store.add_annotator(f"load{i:03d}") for i in range(n_clients)]
    store.close()
    return tokens


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "llmtrain.feedback.app", "--db", str(db), "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning"], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)


async def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=2.0) as c:
        for _ in range(int(timeout / 0.05)):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if (await c.get(f"http://127.0.0.1:{port}/login")).status_code == 200:
                    return time.monotonic() - t0
            except RETRY_ERRORS:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the server on port {port} was not ready within {timeout} s")


def random_tiers(rng: random.Random, k: int) -> list[list[int]]:
    order = list(range(k))
    rng.shuffle(order)
    tiers: list[list[int]] = []
    for i, c in enumerate(order):
        if i and rng.random() < 0.2:
            tiers[-1].append(c)
        else:
            tiers.append([c])
    return tiers


class Stats:
    def __init__(self):
        self.acked = 0
        self.retries = 0
        self.duplicates = 0
        self.submit_ms: list[float] = []
        self.next_ms: list[float] = []
        self.ack_ms: list[float] = []  # from the first try to the acknowledgement, retries included


async def request(c, method: str, url: str, stats: Stats, deadline: float, lat: list, json_body=None) -> dict:
    """One API call, retried on connection errors and 5xx (the same body: the same submission_id)."""
    for attempt in range(MAX_ATTEMPTS):
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed during {method} {url}")
        t = time.perf_counter()
        try:
            status, body = await c.request(method, url, json_body)
        except RETRY_ERRORS:
            status, body = None, b""
        if status is not None and status < 500:
            if status != 200:
                raise RuntimeError(f"{method} {url} -> {status} {body[:200]!r}")
            lat.append((time.perf_counter() - t) * 1000)
            return json.loads(body)
        stats.retries += 1
        await asyncio.sleep(min(0.02 * 2 ** min(attempt, 5), 0.5) * (0.5 + random.random()))
    raise RuntimeError(f"{method} {url}: no answer after {MAX_ATTEMPTS} tries")


async def client(i: int, token: str, port: int, per_client: int, stats: Stats, acks: list, deadline: float,
                 kind: str = "raw") -> None:
    rng = random.Random(i)
    c = CLIENTS[kind](port, token)
    try:
        for n in range(per_client):
            nxt = await request(c, "GET", "/api/next", stats, deadline, stats.next_ms)
            p = nxt["prompt"]
            if p is None:
                raise RuntimeError(f"client {i}: no prompt left after {n} rankings")
            tiers = random_tiers(rng, len(p["candidates"]))
            sid = str(uuid.uuid4())
            t = time.perf_counter()
            r = await request(c, "POST", "/api/submit", stats, deadline, stats.submit_ms,
                              {"prompt_id": p["id"], "status": "ranked", "ranking": tiers, "submission_id": sid})
            stats.ack_ms.append((time.perf_counter() - t) * 1000)
            stats.duplicates += bool(r["duplicate"])
            acks.append((i, p["id"], sid, tiers))
            stats.acked += 1
    finally:
        await c.aclose()


async def killer(proc_box: list, db: Path, port: int, log: Path, at: int, stats: Stats, deadline: float, info: dict) -> None:
    """SIGKILL the server once `at` rankings are acknowledged, then start a new one on the same port."""
    while stats.acked < at:
        if time.monotonic() > deadline or all(t.done() for t in info["clients"]):
            return
        await asyncio.sleep(0.01)
    proc = proc_box[0]
    info["killed_at_acked"] = stats.acked
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    await asyncio.sleep(0.3)  # clients hit a dead port for a moment
    proc_box[0] = start_server(db, port, log)
    await wait_ready(port, proc_box[0])
    info["down_s"] = time.monotonic() - t0


def tiers_of(line: dict) -> list[list[int]]:
    ids, ranks = line["source"]["candidate_ids"], [c["rank"] for c in line["ranked"]]
    out: dict[int, list[int]] = {}
    for i, r in zip(ids, ranks):
        out.setdefault(r, []).append(i)
    return [sorted(out[r]) for r in sorted(out)]


def verify(db: Path, out: Path, acks: list, expected: int, names: list[str]) -> dict:
    from llmtrain.feedback.export import export  # (pulls in llmtrain.data, so torch: fine here, not in the app)

    counts = export(FeedbackStore(db), out)
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    keys = [(x["annotator"], x["source"]["prompt_id"]) for x in lines]
    by_key = {k: x for k, x in zip(keys, lines)}
    lost = [a for a in acks if (names[a[0]], a[1]) not in by_key]
    wrong = [a for a in acks if (names[a[0]], a[1]) in by_key
             and tiers_of(by_key[(names[a[0]], a[1])]) != [sorted(t) for t in a[3]]]
    con = sqlite3.connect(db)
    sids = {r[0] for r in con.execute("SELECT submission_id FROM rankings")}
    con.close()
    return {"exported": counts["exported"], "expected": expected, "acknowledged": len(acks),
            "doubled": len(keys) - len(set(keys)), "lost": len(lost), "wrong_tiers": len(wrong),
            "acked_sid_missing": sum(a[2] not in sids for a in acks),
            "ok": (counts["exported"] == expected == len(acks) and len(keys) == len(set(keys)) and not lost
                   and not wrong and all(a[2] in sids for a in acks))}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def phase(workdir: Path, clients: int, per_client: int, kill: bool, deadline_s: float, kind: str = "raw") -> dict:
    name = "kill" if kill else "steady"
    db = workdir / f"{name}.db"
    log = workdir / f"{name}-server.log"
    tokens = make_db(db, per_client, clients)  # each client ranks every prompt once
    port = free_port()
    proc_box = [start_server(db, port, log)]
    stats, acks, info = Stats(), [], {}
    try:
        await wait_ready(port, proc_box[0])
        deadline = time.monotonic() + deadline_s
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i, tok, port, per_client, stats, acks, deadline, kind))
                 for i, tok in enumerate(tokens)]
        info["clients"] = tasks
        extra = [asyncio.create_task(killer(proc_box, db, port, log, clients * per_client // 2, stats, deadline, info))] if kill else []
        results = await asyncio.gather(*tasks, *extra, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
    finally:
        for p in proc_box:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    names = [f"load{i:03d}" for i in range(clients)]
    v = verify(db, workdir / f"{name}-rankings.jsonl", acks, clients * per_client, names)
    info.pop("clients", None)
    return {"phase": name, "client": kind, "clients": clients, "per_client": per_client, "seconds": elapsed,
            "rankings_per_s": stats.acked / elapsed if elapsed else 0.0,
            "submit_p50_ms": pct(stats.submit_ms, 50), "submit_p99_ms": pct(stats.submit_ms, 99),
            "next_p50_ms": pct(stats.next_ms, 50), "next_p99_ms": pct(stats.next_ms, 99),
            "ack_p50_ms": pct(stats.ack_ms, 50), "ack_p99_ms": pct(stats.ack_ms, 99), "ack_max_ms": max(stats.ack_ms, default=0),
            "retries": stats.retries, "duplicate_acks": stats.duplicates, "errors": errors[:5], **info, **v,
            "ok": v["ok"] and not errors and (not kill or "down_s" in info)}


def report(r: dict) -> str:
    s = (f"[{r['phase']}] {r['clients']} {r['client']} clients x {r['per_client']} = {r['acknowledged']} rankings acknowledged in "
         f"{r['seconds']:.1f} s = {r['rankings_per_s']:.0f} rankings/s\n"
         f"  POST /api/submit latency p50 {r['submit_p50_ms']:.1f} ms, p99 {r['submit_p99_ms']:.1f} ms; "
         f"GET /api/next p50 {r['next_p50_ms']:.1f} ms, p99 {r['next_p99_ms']:.1f} ms\n"
         f"  time to acknowledgement (retries included) p50 {r['ack_p50_ms']:.1f} ms, p99 {r['ack_p99_ms']:.1f} ms, "
         f"max {r['ack_max_ms']:.0f} ms; retried requests {r['retries']}; acks that were duplicates {r['duplicate_acks']}\n")
    if r["phase"] == "kill":
        s += (f"  server SIGKILLed at {r.get('killed_at_acked', '?')} acknowledged rankings, serving again after "
              f"{r.get('down_s', float('nan')):.2f} s\n")
    s += (f"  export: {r['exported']} lines (expected {r['expected']}), lost {r['lost']}, doubled {r['doubled']}, "
          f"wrong tiers {r['wrong_tiers']}, acknowledged ids missing {r['acked_sid_missing']} -> {'OK' if r['ok'] else 'FAILED'}")
    if r["errors"]:
        s += f"\n  client errors: {r['errors']}"
    return s


def run(clients: int = 50, per_client: int = 200, phases=("steady", "kill"), deadline_s: float = 300.0,
        workdir: str | Path | None = None, kind: str = "raw") -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="feedback-load-") as tmp:
        wd = Path(workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        return [_run(phase(wd, clients, per_client, p == "kill", deadline_s, kind)) for p in phases]


def _run(coro):
    """asyncio.run, in a thread of its own where this thread has a loop already (e.g. under
    Playwright's sync API in the same pytest session)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: dict = {}

    def target():
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised below, in the caller's thread
            out["error"] = e
    t = threading.Thread(target=target, name="feedback-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--per-client", type=int, default=200)
    ap.add_argument("--phases", default="steady,kill", help="comma list of steady, kill")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds per phase before clients give up")
    ap.add_argument("--workdir", default=None, help="keep databases, exports and server logs here")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="raw", help="raw asyncio HTTP/1.1 (default) or httpx")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    results = run(a.clients, a.per_client, tuple(a.phases.split(",")), a.deadline, a.workdir, a.client)
    for r in results:
        print(json.dumps(r) if a.json else report(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
