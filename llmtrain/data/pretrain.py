"""Token shards for pretraining: `prepare` writes them, `TokenWindows` draws training windows.

On disk (`out_dir/`):
    meta.json         dtype, vocabulary size, tokenizer hash, and the shard list per split
    train_000.bin ... raw token ids (uint16 when the vocabulary fits, else uint32), documents
    val_000.bin  ...  packed back to back as <|bos|> text <|eos|>

Windows are drawn at random offsets. A step's whole global batch (batch x grad_accum x world
processes) is drawn from one generator seeded by (seed, step), and each (micro-step, rank)
takes its own rows of it. So: a run resumed at step s draws what an uninterrupted run draws;
batch 4 equals 4 micro-steps of 1; and 2 processes see distinct rows of the same global batch
that one process would see.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmtrain.data.corpus import iter_documents
from llmtrain.errors import ConfigError, DataError
from llmtrain.files import disk_full, fsync_dir, fsync_tree, is_disk_full, remove
from llmtrain.tokenizer import Tokenizer

ENCODE_BATCH = 512  # documents per call into the (multi-threaded) Rust encoder


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.fh = None
        self.in_shard = 0
        self.docs = 0
        self.current: Path | None = None
        self.failed = False

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self.fh is None or self.in_shard >= self.shard_tokens:
                self._next_shard()
            take = min(arr.size, self.shard_tokens - self.in_shard)
            self._guarded(self.fh.write, arr[:take].tobytes())
            self.in_shard += take
            self.shards[-1]["tokens"] += take
            arr = arr[take:]
        self.docs += 1

    def _guarded(self, fn, *args):
        """Run a write; on failure remember which file it was, for the error message."""
        try:
            return fn(*args)
        except BaseException:
            self.failed = True
            raise

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.current = self.out / name
        self.fh = self._guarded(open, self.current, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self.in_shard = 0

    def close(self) -> None:
        if self.fh:
            fh, self.fh = self.fh, None
            self._guarded(fh.close)

    def abandon(self) -> None:
        """Close after a failure without raising again (the buffered rest may not fit either)."""
        if self.fh:
            fh, self.fh = self.fh, None
            try:
                fh.close()
            except OSError:
                pass


def restore_ready(out: str | Path) -> None:
    """Put back a complete `out.readyPID` when `out` is missing: a prepare killed between
    setting the old output aside and renaming the new one into place. One rename wins if a
    reader and the prepare itself do it at once."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        return
    ready = sorted(out.parent.glob(out.name + ".ready*"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    for p in reversed(ready):  # the newest first
        if p.name[len(out.name) + 6:].isdigit() and p.is_dir():
            try:
                os.replace(p, out)
                fsync_dir(out.parent)
                return
            except OSError:
                if out.exists():
                    return


def _stale_temps(out: Path) -> list[Path]:
    """Temp (.tmpPID), finished (.readyPID) and set-aside (.oldPID) folders of earlier
    prepares into `out` whose process is gone (killed, crashed)."""
    found = []
    for p in [*out.parent.glob(out.name + ".tmp*"), *out.parent.glob(out.name + ".old*"),
              *out.parent.glob(out.name + ".ready*")]:
        pid = p.name[len(out.name) + (6 if p.name[len(out.name):].startswith(".ready") else 4):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except (ProcessLookupError, OverflowError, ValueError):
            alive = False
        except PermissionError:
            alive = True  # someone else's live process
        if not alive:
            found.append(p)
    return found


@contextlib.contextmanager
def _term_raises():
    """SIGTERM (a plain `kill`) raises SystemExit here, so the cleanup below runs; SIGKILL
    cannot be caught, and its temp folder is removed by the next prepare."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def prepare(inputs: list[str], tokenizer_path: str, out_dir: str, jsonl_field: str = "text",
            val_every: int = 50, shard_tokens: int = 50_000_000) -> dict:
    """Tokenize a corpus into train/val shards, streaming; returns the meta dict.

    Document i (counting from 1) goes to validation when i % val_every == 0: deterministic,
    and independent of how the corpus is split into files. Everything is written under a
    temporary folder next to out_dir, fsynced and renamed into place at the end: a failure or
    a kill leaves no partial output (a temp folder of a SIGKILLed run is removed by the next
    run, which says so), and a full disk is a one-line DiskFullError naming the file.
    """
    if type(shard_tokens) is not int or shard_tokens <= 0:
        raise ConfigError(f"shard_tokens must be a whole number of tokens > 0, got {shard_tokens!r}")
    if val_every < 2:
        raise DataError(f"val_every must be at least 2, got {val_every}")
    tok = Tokenizer.load(tokenizer_path)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    _clear_earlier_runs(out, tmp)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    bar = None
    try:
        with _term_raises():
            tmp.mkdir(parents=True)
            bar = tqdm(desc="prepare", unit=" tok", unit_scale=True, mininterval=1.0, delay=1.0)  # delay: an early error stays one line
            n_doc = _write_documents(iter_documents(inputs, jsonl_field), tok, writers, val_every, bar)
            bar.close()
            for w in writers.values():
                w.close()
            if writers["val"].docs == 0:
                raise DataError(f"only {n_doc} documents: none went to validation (lower prepare val_every={val_every})")
            meta = _meta(inputs, tokenizer_path, tok, dtype, val_every, writers)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            fsync_tree(tmp)
            _swap_into_place(tmp, out)
    except BaseException as e:
        if bar is not None:
            bar.close()  # its line ends, so an error message gets a line of its own
        current = next((w.current for w in writers.values() if w.failed), tmp / "meta.json")
        for w in writers.values():
            w.abandon()
        full = is_disk_full(e, current)
        remove(tmp)
        if full:
            raise disk_full(current, f"the partial output {tmp} was removed") from None
        raise
    return meta


def _clear_earlier_runs(out: Path, tmp: Path) -> None:
    """Before writing: a complete output a killed prepare left under its .ready name comes back
    first; then the temp folders of dead earlier runs (said aloud) and our own `tmp` go."""
    restore_ready(out)
    for stale in _stale_temps(out):
        remove(stale)
        print(f"prepare: removed {stale}, the temp folder of an interrupted earlier run", flush=True)
    remove(tmp)


def _batches(texts, size: int):
    """Lists of `size` texts (the last one shorter, possibly empty)."""
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) >= size:
            yield buf
            buf = []
    yield buf


def _write_documents(texts, tok: Tokenizer, writers: dict[str, _ShardWriter], val_every: int, bar) -> int:
    """Encode the documents ENCODE_BATCH at a time and write each as <|bos|> ids <|eos|> to the
    train or val writer (document i, from 1, to val when i % val_every == 0); -> documents read."""
    n_doc = 0
    for batch in _batches(texts, ENCODE_BATCH):
        for ids in tok.encode_batch(batch):
            n_doc += 1
            split = "val" if n_doc % val_every == 0 else "train"
            doc = [tok.bos_id, *ids, tok.eos_id]
            writers[split].write(doc)
            bar.update(len(doc))
    return n_doc


def _meta(inputs: list[str], tokenizer_path: str, tok: Tokenizer, dtype, val_every: int,
          writers: dict[str, _ShardWriter]) -> dict:
    """meta.json of the finished shards: what load_meta checks and TokenWindows reads."""
    return {
        "format": "llmtrain-shards-v1",
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": file_sha256(tok.path),
        "inputs": [str(i) for i in inputs],
        "val_every": val_every,
        "splits": {s: {"documents": w.docs, "tokens": sum(x["tokens"] for x in w.shards), "shards": w.shards}
                   for s, w in writers.items()},
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """The finished (fsynced) `tmp` becomes `out`. It is renamed .ready first, then the old
    output aside, then .ready into place: at every moment one whole output has a name
    restore_ready() takes, so a kill between the renames loses neither."""
    ready = out.with_name(out.name + f".ready{os.getpid()}")
    old = out.with_name(out.name + f".old{os.getpid()}")
    os.replace(tmp, ready)
    fsync_dir(out.parent)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(ready, out)
    except FileNotFoundError:  # a reader's restore_ready() put it in place meanwhile
        if not out.is_dir():
            raise
    fsync_dir(out.parent)
    remove(old)


def load_meta(shard_dir: str | Path) -> dict:
    d = Path(shard_dir)
    p = d / "meta.json"
    restore_ready(d)  # a prepare killed mid-swap left its whole output as d.readyPID
    if d.exists() and not d.is_dir():
        raise DataError(f"{d}: is a file, not a directory of token shards (written by `llmtrain prepare`)")
    if not p.is_file():
        raise DataError(f"no token shards in {shard_dir} (missing meta.json; run `llmtrain prepare`)")
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{p}: not a valid meta.json ({type(e).__name__}; re-run `llmtrain prepare`)") from None
    if not isinstance(meta, dict) or meta.get("format") != "llmtrain-shards-v1":
        got = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{p}: unknown shard format {got!r} (re-run `llmtrain prepare`)")
    try:
        np.dtype(meta["dtype"])
        if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] <= 0:
            raise ValueError
        for split in ("train", "val"):
            for sh in meta["splits"][split]["shards"]:
                if not (isinstance(sh["file"], str) and "/" not in sh["file"] and isinstance(sh["tokens"], int)):
                    raise ValueError
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{p}: damaged (a field is missing or of the wrong type; re-run `llmtrain prepare`)") from None
    return meta


class TokenWindows:
    """Random windows of `seq_len + 1` tokens from one split's memmapped shards."""

    def __init__(self, shard_dir: str | Path, split: str, seq_len: int, seed: int):
        self.meta = load_meta(shard_dir)
        self.seq_len, self.seed, self.split = seq_len, seed, split
        dtype = np.dtype(self.meta["dtype"])
        self.arrays = []
        for s in self.meta["splits"][split]["shards"]:
            path = Path(shard_dir) / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: missing or of the wrong size for meta.json (re-run `llmtrain prepare`)")
            if s["tokens"] > seq_len + 1:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        if not self.arrays:
            raise DataError(f"{shard_dir}: the {split} split has no shard longer than seq_len+1={seq_len + 1} tokens")
        # Valid start offsets per shard, cumulated, so one uniform draw picks shard and offset.
        starts = np.array([len(a) - seq_len for a in self.arrays], dtype=np.int64)
        self.cum = np.cumsum(starts)
        self.tokens = int(sum(len(a) for a in self.arrays))

    def batch(self, step: int, batch_size: int, micro: int = 0, grad_accum: int = 1, rank: int = 0,
              world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (B, T) for this rank's rows of micro-step `micro` of `step`."""
        stream = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, stream, step])
        offsets = rng.integers(0, self.cum[-1], size=batch_size * grad_accum * world)
        first = (micro * world + rank) * batch_size
        rows = []
        for g in offsets[first:first + batch_size]:
            shard = int(np.searchsorted(self.cum, g, side="right"))
            off = int(g - (self.cum[shard - 1] if shard else 0))
            rows.append(np.asarray(self.arrays[shard][off:off + self.seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]
