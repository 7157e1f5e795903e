"""Metrics: one JSON line per record in `metrics.jsonl`, a console line, optional TensorBoard.

Only rank 0 writes. On resume, records past the resumed step (written by the run that was
killed) are dropped, and so is a torn last line (a kill or a full disk mid-write; the log says
so), so the file always describes one consistent run. A full disk while logging is a one-line
DiskFullError, and the partial line is cut off.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from llmtrain.errors import DataError
from llmtrain.files import disk_full, is_disk_full, write_file


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Metrics:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if (self.path.exists() or self.path.is_symlink()) and not self.path.is_file():
            raise DataError(f"{self.path}: is not a file (a folder or a broken link where the run's metrics go; "
                            "move it away or choose another run.out_dir)")
        if resume_step is None:
            write_file(self.path, b"")
        elif self.path.exists():
            recs, torn = parse_metrics(self.path)
            if torn:
                self.print(f"{self.path}: dropped a torn last line ({torn} bytes) left by an interrupted write")
            keep = [r for r in recs if r.get("step", 0) <= resume_step]
            write_file(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def log(self, step: int, kind: str, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        line = (json.dumps(rec) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            _write_all(fd, line)
        except OSError as e:
            # A full disk may have let part of the line through: cut it off, so the file stays
            # whole lines (truncating frees space, so it works on a full disk).
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            if is_disk_full(e, self.path):
                raise disk_full(self.path, "its last, partial line was removed") from None
            raise
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The console line of a training loop: loss, learning rate, tokens/s and ETA."""

    def __init__(self, start_step: int, max_steps: int, tokens: int = 0, unit: str = "tok"):
        self.start_step, self.max_steps, self.unit = start_step, max_steps, unit
        self.t0 = self.t_last = time.time()
        self.tokens_last = tokens

    def line(self, step: int, tokens: int, **values) -> tuple[str, float]:
        now = time.time()
        tps = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
        eta = (self.max_steps - step) * (now - self.t0) / max(step - self.start_step, 1)
        self.t_last, self.tokens_last = now, tokens
        parts = [f"step {step:>6}/{self.max_steps}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
        return " | ".join(parts + [f"{tps:,.0f} {self.unit}/s", f"ETA {fmt_duration(eta)}"]), tps

    def elapsed(self) -> float:
        return time.time() - self.t0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def parse_metrics(path: str | Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and the length in bytes of a torn last line (0 if none).

    Only the last line may be torn (a kill or a full disk mid-write); it is left out. A bad line
    anywhere else is a DataError naming the file and line."""
    p = Path(path)
    lines = p.read_bytes().split(b"\n")
    recs, torn = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int):
                raise ValueError("not a record with a whole-number step")
        except (ValueError, RecursionError) as e:
            if all(not l.strip() for l in lines[i + 1:]):
                torn = len(raw)
                break
            raise DataError(f"{p}:{i + 1}: not a JSON record ({str(e).splitlines()[0][:80]})") from None
        recs.append(rec)
    return recs, torn


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    recs, _ = parse_metrics(p)
    return [r for r in recs if kind is None or r.get("kind") == kind]
