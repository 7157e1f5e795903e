"""What every chat with a checkpoint shares: loading the model and its tokenizer, fitting the
history to the context window, and decoding the answer as it streams.

The terminal chat (`llmtrain chat`, llmtrain/chat.py) and the ranking app's model worker
(llmtrain/feedback/modelworker.py) both use these, so the two keep and cut a history alike and
show the same text for the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmtrain import checkpoint, dist
from llmtrain.generate import truncate_left
from llmtrain.model import Transformer
from llmtrain.tokenizer import Tokenizer, render_chat


def load_chat_model(ckpt: str, device: str = "auto") -> tuple[Tokenizer, Transformer]:
    """The checkpoint's tokenizer and model, on `device`, in eval mode (a CheckpointError names
    what is wrong with the checkpoint)."""
    ckpt = checkpoint.resolve(ckpt)
    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = checkpoint.load_transformer(ckpt)
    model.to(dist.pick_device(device)).eval()
    return tok, model


@dataclass
class Fitted:
    """A history fitted to the prompt room: the prompt's ids, the messages kept (a copy), how many
    of the oldest were dropped, and the length of the rendered prompt when it was still too long
    and cut from the left (0 when it was not cut)."""
    ids: list[int]
    messages: list[dict] = field(default_factory=list)
    dropped: int = 0
    cut_from: int = 0


def fit_history(tok: Tokenizer, messages: list[dict], room: int) -> Fitted:
    """Render `messages` for an answer; drop the oldest messages (never a leading system message)
    until the prompt fits `room` tokens; a last message still too long is cut from the left
    (its first token, <|bos|>, and its last room - 1 tokens: `generate.truncate_left`)."""
    kept = list(messages)
    first = 1 if kept and kept[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = render_chat(tok, kept, add_generation_prompt=True)[0]
        if len(ids) <= room or len(kept) - first <= 1:
            break
        del kept[first]
        dropped += 1
    return Fitted(truncate_left(ids, room), kept, dropped, len(ids) if len(ids) > room else 0)


class StreamDecoder:
    """An answer decoded as its tokens come: `push(token)` -> the text to show now (empty while a
    UTF-8 character is still incomplete, or for a stop token, which is never shown); `rest()` ->
    what is still unshown at the end (the answer's tail, even a broken character)."""

    def __init__(self, tok: Tokenizer, stop_ids=()):
        self.tok, self.stop_ids = tok, set(stop_ids)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        now = self.tok.decode(self.ids, skip_special=True)
        if now.endswith("\ufffd"):  # wait for a whole UTF-8 character
            return ""
        new, self.shown = now[len(self.shown):], now
        return new

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special=True)

    def rest(self) -> str:
        text = self.text
        new, self.shown = text[len(self.shown):], text
        return new


def seeded_generator(model: Transformer, seed: int) -> torch.Generator:
    """A sampling generator on the model's device, seeded."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
