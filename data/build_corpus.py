"""Rebuild data/corpus/chitchat.txt from the `chitchat-dataset` pip package (MIT licence).

    pip install chitchat-dataset==0.9.0 && python data/build_corpus.py

Each conversation becomes one document (a block of lines, one line per turn; a turn is the
consecutive messages of one speaker joined by spaces), documents separated by a blank line.
Conversations are kept in the package's order up to MAX_BYTES; whitespace inside a message is collapsed.
"""
import json
import re
from pathlib import Path

import chitchat_dataset

src = Path(chitchat_dataset.__file__).parent / "dataset.json"
out = Path(__file__).parent / "corpus" / "chitchat.txt"
data = json.loads(src.read_text())
ws = re.compile(r"\s+")
MAX_BYTES = 4_000_000  # a few MB: more than the CPU demo can read, small enough for the repo
docs, size = [], 0
for conv in data.values():
    turns = [ws.sub(" ", " ".join(m["text"] for m in turn)).strip() for turn in conv["messages"]]
    turns = [t for t in turns if t]
    if len(turns) >= 2:
        doc = "\n".join(turns)
        if size + len(doc.encode()) + 2 > MAX_BYTES:
            break
        docs.append(doc)
        size += len(doc.encode()) + 2
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n\n".join(docs) + "\n")
print(f"{len(docs)} conversations, {out.stat().st_size / 1e6:.1f} MB -> {out}")
