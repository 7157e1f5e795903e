"""`llmtrain chat CKPT`: talk to a fine-tuned (or later) checkpoint in the terminal.

History is kept within the context window (the oldest turns are dropped first, a system
message stays), tokens are printed as they are generated, `/reset` clears the history and
`/exit` (or end of input) leaves. `--prompt` answers once, for scripts.
"""
from __future__ import annotations

import sys

import torch

from llmtrain import checkpoint, dist
from llmtrain.generate import SamplingConfig, generate
from llmtrain.model import Transformer
from llmtrain.tokenizer import Tokenizer, render_chat


class ChatSession:
    def __init__(self, ckpt: str, sampling: SamplingConfig, system: str = "", device: str = "auto", seed: int = 0):
        ckpt = checkpoint.resolve(ckpt)
        self.tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
        self.model = Transformer(checkpoint.model_config(ckpt))
        checkpoint.load_weights(ckpt, self.model)
        self.model.to(dist.pick_device(device)).eval()
        self.sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                                       (self.tok.end_id, self.tok.eos_id))
        self.system = system
        self.generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        """Render the history; drop the oldest exchanges until prompt + answer fit the window."""
        room = self.model.config.max_seq_len - self.sampling.max_new_tokens
        while True:
            ids = render_chat(self.tok, self.history, add_generation_prompt=True)[0]
            first = 1 if self.history and self.history[0]["role"] == "system" else 0
            if len(ids) <= room or len(self.history) - first <= 1:
                return ids[-room:]
            del self.history[first]

    def reply(self, text: str, stream=None) -> str:
        self.history.append({"role": "user", "content": text})
        got: list[int] = []
        shown = ""

        def on_token(step_ids):
            nonlocal shown
            t = step_ids[0]
            if t in self.sampling.stop_ids:
                return
            got.append(t)
            now = self.tok.decode(got, skip_special=True)
            if stream is not None and not now.endswith("\ufffd"):  # wait for a whole UTF-8 character
                stream.write(now[len(shown):])
                stream.flush()
                shown = now

        generate(self.model, [self._prompt()], self.sampling, pad_id=self.tok.pad_id, generator=self.generator,
                 on_token=on_token)
        answer = self.tok.decode(got, skip_special=True)
        if stream is not None:
            stream.write(answer[len(shown):] + "\n")
            stream.flush()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def repl(session: ChatSession, stdin=sys.stdin, stdout=sys.stdout) -> None:
    stdout.write("chat: type a message; /reset clears the history, /exit leaves.\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        stdout.write("bot> ")
        session.reply(text, stream=stdout)
