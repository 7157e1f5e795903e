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

from llmtrain.conversation import StreamDecoder, fit_history, load_chat_model, seeded_generator
from llmtrain.generate import SamplingConfig, generate, prompt_budget


class ChatSession:
    def __init__(self, ckpt: str, sampling: SamplingConfig, system: str = "", device: str = "auto", seed: int = 0):
        self.tok, self.model = load_chat_model(ckpt, device)
        self.sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                                       self.tok.stop_ids)
        ctx = self.model.config.max_seq_len
        self.room = prompt_budget(ctx, sampling.max_new_tokens)
        self.fit_note = (f"{self.room} tokens (the context window of {ctx} tokens with --max-new-tokens "
                         f"{sampling.max_new_tokens})")
        self.notice = lambda msg: print(msg, file=sys.stderr, flush=True)  # the REPL shows notes inline
        self.system = system
        self.generator = seeded_generator(self.model, seed)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        """The history fitted to the window (`conversation.fit_history`: the oldest messages
        dropped, a last one still too long cut from the left), and a note saying so."""
        fit = fit_history(self.tok, self.history, self.room)
        self.history = fit.messages
        if fit.dropped:
            self.notice(f"(chat: the {fit.dropped} oldest message(s) dropped from the history to fit {self.fit_note})")
        if fit.cut_from:
            self.notice(f"(chat: the prompt of {fit.cut_from} tokens is cut to its first token and its last "
                        f"{self.room - 1} to fit {self.fit_note})")
        return fit.ids

    def reply(self, text: str, stream=None, prefix: str = "") -> str:
        """Answer `text`; with `stream`, `prefix` and then each token are written to it as they come
        (after any note on the history)."""
        self.history.append({"role": "user", "content": text})
        prompt = self._prompt()
        if stream is not None and prefix:
            stream.write(prefix)
            stream.flush()
        decoder = StreamDecoder(self.tok, self.sampling.stop_ids)

        def on_token(step_ids):
            new = decoder.push(step_ids[0])
            if stream is not None and new:
                stream.write(new)
                stream.flush()

        generate(self.model, [prompt], self.sampling, pad_id=self.tok.pad_id, generator=self.generator,
                 on_token=on_token)
        answer = decoder.text
        if stream is not None:
            stream.write(decoder.rest() + "\n")
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
