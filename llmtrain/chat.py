"""`llmtrain chat CKPT`: talk to a fine-tuned (or later) checkpoint in the terminal.

History is kept within the context window less --max-new-tokens (at least half the window, see
`generate.prompt_budget`): the oldest turns are dropped first (a system message stays), and a
prompt that still does not fit is cut from the left; either is said on stderr (in the terminal
chat, inline). Tokens are printed as they are
generated, `/reset` clears the history and `/exit` (or end of input) leaves. `--prompt`
answers once, for scripts. What the user types is text: a `<|end|>` in it is not a turn end.
"""
from __future__ import annotations

import sys

import torch

from llmtrain import checkpoint, dist
from llmtrain.generate import SamplingConfig, generate, prompt_budget, truncate_left
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
                                       self.tok.stop_ids)
        ctx = self.model.config.max_seq_len
        self.room = prompt_budget(ctx, sampling.max_new_tokens)
        self.fit_note = (f"{self.room} tokens (the context window of {ctx} tokens with --max-new-tokens "
                         f"{sampling.max_new_tokens})")
        self.notice = lambda msg: print(msg, file=sys.stderr, flush=True)  # the REPL shows notes inline
        self.system = system
        self.generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        """Render the history; drop the oldest messages (not a system message) until prompt +
        answer fit the window; a last message still too long is cut from the left. Says so."""
        room, dropped = self.room, 0
        while True:
            ids = render_chat(self.tok, self.history, add_generation_prompt=True)[0]
            first = 1 if self.history and self.history[0]["role"] == "system" else 0
            if len(ids) <= room or len(self.history) - first <= 1:
                break
            del self.history[first]
            dropped += 1
        if dropped:
            self.notice(f"(chat: the {dropped} oldest message(s) dropped from the history to fit {self.fit_note})")
        if len(ids) > room:
            self.notice(f"(chat: the prompt of {len(ids)} tokens is cut to its first token and its last {room - 1} to fit {self.fit_note})")
        return truncate_left(ids, room)

    def reply(self, text: str, stream=None, prefix: str = "") -> str:
        """Answer `text`; with `stream`, `prefix` and then each token are written to it as they come
        (after any note on the history)."""
        self.history.append({"role": "user", "content": text})
        prompt = self._prompt()
        if stream is not None and prefix:
            stream.write(prefix)
            stream.flush()
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

        generate(self.model, [prompt], self.sampling, pad_id=self.tok.pad_id, generator=self.generator,
                 on_token=on_token)
        answer = self.tok.decode(got, skip_special=True)
        if stream is not None:
            stream.write(answer[len(shown):] + "\n")
            stream.flush()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def repl(session: ChatSession, stdin=sys.stdin, stdout=sys.stdout) -> None:
    stdout.write("chat: type a message; /reset clears the history, /exit leaves.\n")
    session.notice = lambda msg: stdout.write(msg + "\n")
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
        session.reply(text, stream=stdout, prefix="bot> ")
