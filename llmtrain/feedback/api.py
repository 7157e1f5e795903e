"""The JSON API of the ranking app, and the views of the store that it and the pages show.

Every handler is fn(gate, request, annotator, token, data) -> Response, marked with
`web.endpoint` and put behind authentication and CSRF by `auth.Gate.wrap`; it runs in
Starlette's threadpool. Everything is scoped to the signed-in annotator.
Imports only the store, agreement, the web helpers, the stdlib and Starlette (never torch)."""
from __future__ import annotations

import re

from starlette.responses import JSONResponse, RedirectResponse, Response

from llmtrain.feedback import arena_stats
from llmtrain.feedback.agreement import summarize
from llmtrain.feedback.store import MAX_ID, STATUSES, Annotator, FeedbackStore, StoreBusy, StoreError
from llmtrain.feedback.web import LABELS, display_order, endpoint, error, parse_id, shown

SUBMIT_FIELDS = ("prompt_id", "status", "ranking", "submission_id")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# ---- views of the store (run in the threadpool)


def split_prompt(msgs: list[dict], prompt: str) -> tuple[list[dict], str]:
    """(the conversation before the question, the question) as a page shows them."""
    last_user = bool(msgs) and msgs[-1].get("role") == "user"
    context = msgs[:-1] if last_user else msgs
    return [{"role": m["role"], "content": m["content"]} for m in context], msgs[-1]["content"] if last_user else prompt


def prompt_view(store: FeedbackStore, annotator: Annotator, prompt_id: int) -> dict | None:
    p = store.prompt(prompt_id)
    if p is None:
        return None
    order = display_order(annotator.id, p["id"], len(p["candidates"]))
    context, text = split_prompt(p["messages"], p["prompt"])
    n, of = store.round_of(p["id"])
    return {"id": p["id"], "prompt": text, "context": context,
            "candidates": [dict(p["candidates"][i], label=LABELS[pos]) for pos, i in enumerate(order)],
            "round": {"n": n, "of": of}}


def progress_of(store: FeedbackStore, annotator: Annotator) -> dict:
    c = store.status_counts(annotator)
    return {"done": sum(c[s] for s in STATUSES), **c}


def my_judgement(store: FeedbackStore, annotator: Annotator, prompt_id: int) -> dict | None:
    return next((j for j in store.judgements(annotator) if j["prompt_id"] == prompt_id), None)


def next_view(store: FeedbackStore, annotator: Annotator) -> dict:
    closed = store.round_closed()  # an admin closed the round: nothing more is asked
    pid = None if closed else store.next_prompt(annotator)
    return {"prompt": prompt_view(store, annotator, pid) if pid is not None else None,
            "progress": progress_of(store, annotator), "closed": closed}


def mine_rows(store: FeedbackStore, annotator: Annotator) -> list[dict]:
    rows = []
    for j in store.judgements(annotator):
        p = store.prompt(j["prompt_id"])
        order = display_order(annotator.id, p["id"], len(p["candidates"]))
        label = {i: LABELS[pos] for pos, i in enumerate(order)}
        if j["status"] == "ranked":
            summary = " > ".join(" = ".join(label[i] for i in tier) for tier in j["ranking"])
        else:
            summary = {"all_bad": "all unacceptable", "skipped": "skipped"}[j["status"]]
        rows.append({"prompt_id": p["id"], "prompt": p["prompt"], "status": j["status"], "summary": summary,
                     "created": j["created"]})
    return rows


def admin_data(store: FeedbackStore) -> dict:
    judgements = store.judgements()
    total = len(store.prompt_ids())
    per = {a.name: {"annotator": a.name, "is_admin": a.is_admin, "simulated": a.simulated, "total": total,
                    **dict.fromkeys(STATUSES, 0)} for a in store.annotators()}
    for j in judgements:
        per[j["annotator"]][j["status"]] += 1
    for p in per.values():
        p["done"] = sum(p[s] for s in STATUSES)
    open_ids = store.open_prompts()
    return {"progress": list(per.values()), "agreement": summarize(judgements),
            "round": {"closed": store.round_closed(), "prompts": total, "open": open_ids}, "arena": arena_summary(store)}


def arena_summary(store: FeedbackStore) -> dict:
    """The arena's figures (arena_stats.py) over every vote, and over people's votes alone."""
    votes = store.arena_votes()
    order = [m["name"] for m in store.arena_models()]
    people = [v for v in votes if not v["simulated"]]
    return {"counts": store.arena_counts(), "simulated_votes": len(votes) - len(people),
            "everyone": arena_stats.summary(votes, order), "people": arena_stats.summary(people, order)}


def validate(data: dict, need_sid: bool) -> tuple[int, str, list | None, str]:
    """(prompt_id, status, ranking, submission_id) of a submission; StoreError names what is wrong."""
    unknown = [k for k in data if k not in SUBMIT_FIELDS]
    if unknown:
        raise StoreError(f"unknown field {shown(unknown[0])} (the fields are {', '.join(SUBMIT_FIELDS)})")
    pid, status, ranking, sid = data.get("prompt_id"), data.get("status"), data.get("ranking"), data.get("submission_id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise StoreError("prompt_id must be an integer")
    if not 1 <= pid <= MAX_ID:
        raise StoreError(f"prompt_id must be an integer from 1 to {MAX_ID}")
    if not isinstance(status, str):
        raise StoreError(f"status must be a string, one of {', '.join(STATUSES)}")
    if status not in STATUSES:
        raise StoreError(f"status must be one of {', '.join(STATUSES)}")
    if status == "ranked" and not isinstance(ranking, list):
        raise StoreError("a ranked submission needs 'ranking': tiers of candidate indices, best first")
    if status != "ranked" and ranking is not None:  # never silently dropped
        raise StoreError(f"ranking must be left out (or null) when status is {status}: only a ranked submission has one")
    if need_sid:
        check_submission_id(sid)
    return pid, status, ranking if status == "ranked" else None, sid


def check_submission_id(sid) -> None:
    """A client-made submission id: 1-100 characters, no control characters (else StoreError)."""
    if not isinstance(sid, str) or not 1 <= len(sid) <= 100:
        raise StoreError("submission_id must be a string of 1-100 characters (a client-made uuid)")
    if bad := _CONTROL.search(sid):
        raise StoreError(f"submission_id must not contain control characters (it has {shown(bad.group())})")


# ---- endpoints (gate: auth.Gate)


@endpoint()
def api_session(gate, request, annotator, token, _=None) -> Response:
    return JSONResponse({"annotator": annotator.name, "is_admin": annotator.is_admin, "csrf": gate.csrf_for(token)})


def json_view(view, name: str):
    """The endpoint `name` that answers view(store, annotator) as JSON (a read)."""
    @endpoint()
    def handler(gate, request, annotator, token, _=None) -> Response:
        return JSONResponse(view(gate.store, annotator))
    handler.__name__ = handler.__qualname__ = name
    return handler


api_next = json_view(next_view, "api_next")
api_progress = json_view(progress_of, "api_progress")


@endpoint()
def api_prompt(gate, request, annotator, token, _=None) -> Response:
    pid = parse_id(request.path_params["prompt_id"])
    view = prompt_view(gate.store, annotator, pid) if pid is not None else None
    if view is None:
        return error(f"no prompt with id {shown(request.path_params['prompt_id'])} "
                     f"(prompt ids are whole numbers from 1 to {MAX_ID})", 404)
    j = my_judgement(gate.store, annotator, pid)
    mine = {k: j[k] for k in ("status", "ranking", "created")} if j else None
    return JSONResponse({"prompt": view, "judgement": mine, "progress": progress_of(gate.store, annotator),
                         "closed": gate.store.round_closed()})


@endpoint()
def api_mine(gate, request, annotator, token, _=None) -> Response:
    return JSONResponse({"judgements": mine_rows(gate.store, annotator)})


@endpoint()
def api_judgement(gate, request, annotator, token, _=None) -> Response:
    pid = parse_id(request.path_params["prompt_id"])
    j = my_judgement(gate.store, annotator, pid) if pid is not None else None
    if j is None:
        return error(f"you have no judgement of prompt {shown(request.path_params['prompt_id'])}", 404)
    return JSONResponse({k: j[k] for k in ("prompt_id", "status", "ranking", "created")})


def round_is_closed() -> Response:
    return JSONResponse({"error": "the round is closed (an admin closed it; nothing more is recorded)",
                         "closed": True}, status_code=409)


def record_once(gate, write) -> tuple[bool, Response | None]:
    """A submission's write (a ranking, an arena vote; keyed by its submission id) under the write
    lock -> (recorded: False for a duplicate, None), or (False, 409 once the round is closed / 400
    with the store's one line). The handler already holds the app's write slot (Gate.run_write)."""
    if gate.store.round_closed():  # under the write lock: closing and submitting do not interleave
        return False, round_is_closed()
    try:
        with gate.write_lock:
            return write(), None
    except StoreBusy:
        raise  # 503 (Gate.run_write)
    except StoreError as e:
        return False, error(str(e), 400)


@endpoint(write=True, body="json")
def api_submit(gate, request, annotator, token, data) -> Response:
    try:
        pid, status, ranking, sid = validate(data, need_sid=True)
    except StoreError as e:
        return error(str(e), 400)
    recorded, refused = record_once(gate, lambda: gate.store.submit(annotator, pid, status, ranking, sid))
    if refused is not None:
        return refused
    return JSONResponse({"ok": True, "recorded": recorded, "duplicate": not recorded, "submission_id": sid})


@endpoint(write=True, body="json")
def api_change(gate, request, annotator, token, data) -> Response:
    try:
        pid, status, ranking, _ = validate(data, need_sid=False)
        if gate.store.round_closed():
            return round_is_closed()
        if my_judgement(gate.store, annotator, pid) is None:  # only one's own: another's is not there to change
            return JSONResponse({"error": f"you have no judgement of prompt {pid} to change"}, status_code=404)
        with gate.write_lock:
            gate.store.change(annotator, pid, status, ranking)
    except StoreBusy:
        raise  # 503 (Gate.run_write)
    except StoreError as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    return JSONResponse({"ok": True})


@endpoint()
def api_admin(gate, request, annotator, token, _=None) -> Response:
    if not annotator.is_admin:
        return JSONResponse({"error": "admins only"}, status_code=403)
    return JSONResponse(admin_data(gate.store))


def close_round(gate, annotator: Annotator) -> Response | None:
    if not annotator.is_admin:
        return JSONResponse({"error": "admins only"}, status_code=403)
    with gate.write_lock:
        gate.store.close_round()
    return None


@endpoint(page=True, write=True, body="form")
def admin_close(gate, request, annotator, token, form) -> Response:
    return close_round(gate, annotator) or RedirectResponse("/admin", status_code=303)


@endpoint(write=True)
def api_admin_close(gate, request, annotator, token, _=None) -> Response:
    return close_round(gate, annotator) or JSONResponse({"ok": True, "closed": True})
