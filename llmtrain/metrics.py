"""Metrics: one JSON line per record in `metrics.jsonl`, a console line, optional TensorBoard.

Only rank 0 writes. On resume, records past the resumed step (written by the run that was
killed) are dropped, so the file always describes one consistent run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
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
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
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


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    recs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]
