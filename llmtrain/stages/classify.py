"""A task-specific head: fine-tune the backbone with a classification layer on labelled text.

    llmtrain classify -c configs/classify.yaml init_from=runs/pretrain
    llmtrain classify predict runs/classify --text "..." [--input texts.jsonl]

The word head is replaced by `score` (n_labels outputs) read at the text's final token;
cross-entropy over labels; accuracy and a confusion matrix on held-out data.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmtrain import checkpoint, dist, training
from llmtrain.config import ClassifyConfig
from llmtrain.data import classify as cls_data
from llmtrain.data.jsonl import split
from llmtrain.data.sft import LengthBatches
from llmtrain.errors import CheckpointError, DataError
from llmtrain.model.adapters import freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.tokenizer import Tokenizer
from llmtrain.training import count_params, optimizer_step


def main(cfg: ClassifyConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    base, tok_path, tok, mcfg = training.load_base(cfg.init_from, "init_from",
                                                   "a pretrained or fine-tuned checkpoint", cfg.run.out_dir)

    # ---- data, labels, model
    max_len = cfg.data.max_len or mcfg.max_seq_len
    items, skipped = cls_data.read(cfg.data.train, cfg.data.skip_bad_lines, cfg.data.columns)
    if cfg.data.val:
        train_items = items
        val_items, more = cls_data.read(cfg.data.val, cfg.data.skip_bad_lines, cfg.data.columns)
        skipped += more
    else:
        train_items, val_items = split(items, cfg.data.val_every)
    labels = sorted({label for _, (_, label) in train_items})
    unknown = sorted({label for _, (_, label) in val_items} - set(labels))
    if unknown:
        raise DataError(f"held-out labels never seen in training: {', '.join(unknown)}")
    if len(labels) < 2:
        raise DataError(f"{cfg.data.train}: at least two labels are needed, found {labels}")
    train_ex = cls_data.encode(tok, train_items, labels, max_len)
    val_ex = cls_data.encode(tok, val_items, labels, max_len)

    torch.manual_seed(run.seed)
    model = ScoreModel(mcfg, len(labels))
    checkpoint.load_weights(base, model, new_head=("score.",))
    frozen = freeze(model, cfg.freeze.patterns, cfg.freeze.first_layers)
    model.to(env.device)
    s = training.start("classify", cfg, model, mcfg, tok_path, env)
    log, optimizer, start_step = s.log, s.optimizer, s.start_step
    batches = LengthBatches(train_ex, run.batch_size * run.grad_accum * env.world, run.seed)

    trainable, total = count_params(model)
    training.announce(s, f"classify: {len(labels)} labels {labels}; {len(train_ex)} train / {len(val_ex)} held-out "
                         f"texts ({skipped} bad lines skipped); {trainable / 1e6:.2f}M of {total / 1e6:.2f}M "
                         f"parameters trainable ({len(frozen)} tensors frozen)")
    global_batch = run.batch_size * run.grad_accum * env.world
    val_eval = val_ex[: run.eval_batches * run.batch_size or None]  # the first run.eval_batches batches (0: all)

    def evaluate(done: int) -> dict:
        confusion = confusion_matrix(model, val_eval, len(labels), tok.pad_id, run.batch_size, env.device, run.precision)
        result = {"accuracy": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
                  "confusion": confusion.tolist()}
        log.log(done, "val", **result)
        log.print(f"step {done:>6} | held-out accuracy {result['accuracy']:.3f}")
        return result

    def save(step: int, texts: int, result: dict) -> None:
        training.save(s, step, {"tokens": 0, "accuracy": result.get("accuracy")}, labels=labels)

    # ---- the loop
    progress = training.begin(s, start_step * global_batch, unit="texts")
    result = {}
    for step, lr in training.steps(s):

        def loss_of(micro, m):
            rows = batches.rows(step, run.batch_size, micro, env.rank, env.world)
            x, lengths = cls_data.collate(rows, tok.pad_id)
            y = torch.tensor([r.label for r in rows], device=env.device)
            # Sum over this micro-batch's rows / the global batch: the step's mean over all rows.
            return F.cross_entropy(m(x.to(env.device), lengths).float(), y, reduction="sum") * env.world / global_batch

        step_loss = training.accumulate(s.train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        done = step + 1
        result = training.end_step(s, progress, done, step_loss, lr, grad_norm, done * global_batch, evaluate, save,
                                   result)
    if result:
        log.print("confusion matrix (rows: true label, columns: predicted)\n" + format_confusion(labels, result["confusion"]))
    return training.finish(s, progress)


def confusion_matrix(model: ScoreModel, rows: list, n_labels: int, pad_id: int, batch_size: int, device,
                     precision: str) -> torch.Tensor:
    """Counts of (true label, predicted label) over `rows`, in batches of `batch_size`."""
    model.eval()
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.long)
    with torch.no_grad(), dist.autocast(device, precision):
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            x, lengths = cls_data.collate(batch, pad_id)
            pred = model(x.to(device), lengths).argmax(-1).cpu()
            for r, p in zip(batch, pred.tolist()):
                confusion[r.label, p] += 1
    model.train()
    return confusion


def format_confusion(labels: list[str], confusion: list[list[int]]) -> str:
    w = max(6, *(len(l) for l in labels))
    head = " " * w + " " + " ".join(f"{l[:w]:>{w}}" for l in labels)
    rows = [f"{l:>{w}} " + " ".join(f"{n:>{w}}" for n in r) for l, r in zip(labels, confusion)]
    return "\n".join([head, *rows])


def load_classifier(ckpt: str | Path, device: str = "auto") -> tuple[ScoreModel, Tokenizer, list[str]]:
    ckpt = checkpoint.resolve(ckpt)
    conf = checkpoint.read_config(ckpt)
    if conf.get("stage") != "classify":
        raise CheckpointError(f"{ckpt}: not a classifier checkpoint (stage {conf.get('stage')!r})")
    labels = conf["labels"]
    model = ScoreModel(checkpoint.model_config(ckpt), len(labels))
    checkpoint.load_weights(ckpt, model)
    model.to(dist.pick_device(device)).eval()
    return model, Tokenizer.load(checkpoint.tokenizer_of(ckpt)), labels


@torch.no_grad()
def predict(model: ScoreModel, tok: Tokenizer, labels: list[str], texts: list[str], batch_size: int = 32) -> list[dict]:
    """-> [{"label": name, "probs": {name: p}}] for each text."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        seqs = [cls_data.encode_text(tok, t, model.config.max_seq_len) for t in texts[i:i + batch_size]]
        x, lengths = cls_data.collate(seqs, tok.pad_id)
        probs = torch.softmax(model(x.to(device), lengths).float(), -1).cpu()
        for p in probs:
            out.append({"label": labels[int(p.argmax())], "probs": {l: round(float(v), 4) for l, v in zip(labels, p)}})
    return out
