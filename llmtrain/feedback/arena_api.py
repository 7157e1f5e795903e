"""The blind arena's JSON API (the page is pages.arena_page + static/arena.js):

    GET  /api/arena/next              the next match this annotator has not voted on (null: none left)
    GET  /api/arena/match/{match_id}  one match, with this annotator's vote on it when there is one
    POST /api/arena/vote              {"match_id", "prompt_id", "vote": "a" | "b" | "tie" | "both_bad",
                                       "submission_id"}: recorded once per submission id
    POST /api/arena/ask               {"prompt"}: a person's own prompt, answered live by every arena
                                      model through the chat's model worker (501 without one)

Blind: the view of a match names no model and no model id; its two answers are on sides A and B
as drawn for this annotator (arena_store.arena_sides: the same on every reload, independent
between annotators). The names come only with this annotator's own vote on that match: in the
vote's answer, and in the match's view after it. Votes are refused (409) once the round is closed.

Every handler is fn(gate, request, annotator, token, data) -> Response behind `auth.Gate.wrap`.
Imports only the store, the API's helpers, the web helpers, the stdlib and Starlette (never torch)."""
from __future__ import annotations

from typing import Protocol

from starlette.responses import JSONResponse, Response

from llmtrain.feedback.api import check_submission_id, json_view, record_once, round_is_closed, split_prompt
from llmtrain.feedback.arena_store import VOTES, arena_sides
from llmtrain.feedback.store import MAX_ID, Annotator, FeedbackStore, StoreError
from llmtrain.feedback.web import endpoint, error, parse_id, shown

VOTE_FIELDS = ("match_id", "prompt_id", "vote", "submission_id")
MAX_PROMPT = 4000  # characters of a person's own prompt


class ArenaWorker(Protocol):
    """What answers a person's own prompt: the model worker (llmtrain's chat worker, wired in by
    `create_app(..., arena_worker=...)`). Called in one of the app's worker threads, outside the
    write lock; it may take seconds, and must not raise for a prompt a model cannot answer well."""

    def answer(self, models: list[dict], messages: list[dict]) -> dict[str, dict]:
        """{model name: {"text", "finished", "n_tokens"}} for each of `models` ({"id", "name",
        "checkpoint"}, the arena's models) answering the conversation `messages`."""


def match_view(annotator: Annotator, m: dict) -> dict:
    """A match as this annotator sees it: the prompt and the answers on sides A and B, no names."""
    a, b = arena_sides(annotator.id, m["prompt_id"], m["x"]["id"], m["y"]["id"])
    by_id = {m["x"]["id"]: m["x"], m["y"]["id"]: m["y"]}
    context, text = split_prompt(m["messages"], m["prompt"])
    return {"id": m["id"], "prompt_id": m["prompt_id"], "prompt": text, "context": context,
            "own": m["owner_id"] is not None,
            "answers": [{"side": side, "text": by_id[i]["text"], "finished": by_id[i]["finished"],
                         "n_tokens": by_id[i]["n_tokens"]} for side, i in (("A", a), ("B", b))]}


def next_view(store: FeedbackStore, annotator: Annotator) -> dict:
    closed = store.round_closed()
    mid = None if closed else store.arena_next(annotator)
    return {"match": match_view(annotator, store.arena_match(mid)) if mid is not None else None,
            "progress": store.arena_progress(annotator), "closed": closed}


def validate_vote(data: dict) -> tuple[int, int, str, str]:
    """(match_id, prompt_id, vote, submission_id) of a vote; StoreError names what is wrong."""
    unknown = [k for k in data if k not in VOTE_FIELDS]
    if unknown:
        raise StoreError(f"unknown field {shown(unknown[0])} (the fields are {', '.join(VOTE_FIELDS)})")
    for k in ("match_id", "prompt_id"):
        v = data.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ID:
            raise StoreError(f"{k} must be an integer from 1 to {MAX_ID}")
    vote = data.get("vote")
    if not isinstance(vote, str) or vote not in VOTES:
        raise StoreError(f"vote must be one of {', '.join(VOTES)} (a string)")
    check_submission_id(data.get("submission_id"))
    return data["match_id"], data["prompt_id"], vote, data["submission_id"]


def _is_text(s) -> bool:
    """A string SQLite can store (no lone surrogate)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- endpoints (gate: auth.Gate)


api_arena_next = json_view(next_view, "api_arena_next")


@endpoint()
def api_arena_match(gate, request, annotator, token, _=None) -> Response:
    mid = parse_id(request.path_params["match_id"])
    m = gate.store.arena_match(mid) if mid is not None else None
    if not gate.store.arena_visible(annotator, m):  # another person's own prompt is not there
        return error(f"no arena match with id {shown(request.path_params['match_id'])} "
                     f"(match ids are whole numbers from 1 to {MAX_ID})", 404)
    mine = gate.store.arena_my_vote(annotator, mid)
    return JSONResponse({"match": match_view(annotator, m),
                         "vote": {k: mine[k] for k in ("vote", "reveal", "created")} if mine else None,
                         "progress": gate.store.arena_progress(annotator), "closed": gate.store.round_closed()})


@endpoint(write=True, body="json")
def api_arena_vote(gate, request, annotator, token, data) -> Response:
    try:
        mid, pid, vote, sid = validate_vote(data)
    except StoreError as e:
        return error(str(e), 400)
    recorded, refused = record_once(gate, lambda: gate.store.arena_vote(annotator, mid, pid, vote, sid))
    if refused is not None:
        return refused
    mine = gate.store.arena_my_vote(annotator, mid)  # on a duplicate: the vote recorded first
    return JSONResponse({"ok": True, "recorded": recorded, "duplicate": not recorded, "submission_id": sid,
                         "vote": mine["vote"], "reveal": mine["reveal"],
                         "progress": gate.store.arena_progress(annotator)})


@endpoint(body="json", csrf=True)
def api_arena_ask(gate, request, annotator, token, data) -> Response:
    """A person's own prompt: every arena model answers it live (gate.arena_worker, outside the
    write lock), then the prompt, the answers and one match per pair are stored as this person's
    own (no one else sees them) -> the first match's view. 501 when the app serves no models."""
    unknown = [k for k in data if k != "prompt"]
    prompt = data.get("prompt")
    if unknown:
        return error(f"unknown field {shown(unknown[0])} (the only field is prompt)", 400)
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        return error(f"prompt must be a string of 1-{MAX_PROMPT} characters, not all blank", 400)
    if gate.arena_worker is None:
        return error("answers to your own prompt need the models served (feedback serve --model NAME=CKPT); "
                     "vote on the arena's prompts meanwhile", 501)
    if gate.store.round_closed():
        return round_is_closed()
    models = gate.store.arena_models()
    if len(models) < 2:
        return error("the arena has fewer than two models (`llmtrain feedback arena-generate` adds them)", 409)
    messages = [{"role": "user", "content": prompt}]
    got = gate.arena_worker.answer(models, messages)
    answers = {}
    for m in models:
        a = got.get(m["name"]) if isinstance(got, dict) else None
        if not isinstance(a, dict) or not _is_text(a.get("text")):
            return error(f"the model worker gave no answer for arena model {shown(m['name'])} (is it served under that "
                         f"name, feedback serve --model {shown(m['name'])}=CKPT?), or it failed; try again", 502)
        n = a.get("n_tokens", 0)
        answers[m["id"]] = {"text": a["text"], "finished": a.get("finished", True) is not False,
                            "n_tokens": n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 else 0}

    def store_it() -> Response:
        _, ids = gate.store.add_arena_prompt(messages, answers, owner=annotator)
        return JSONResponse({"ok": True, "matches": len(ids),
                             "match": match_view(annotator, gate.store.arena_match(ids[0]))})
    return gate.run_write(store_it)
