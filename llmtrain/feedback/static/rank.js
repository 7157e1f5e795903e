// The ranking page: order K candidate answers by drag and drop or keyboard, mark ties, submit.
// Model text is only ever put into the page with textContent: never innerHTML. Needs common.js.
"use strict";
(function () {
  const root = document.getElementById("rank");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const list = $("cands");
  const buttons = [$("submit"), $("allbad"), $("skip")];
  const editId = root.dataset.prompt ? parseInt(root.dataset.prompt, 10) : null;

  let current = null;       // the prompt shown: {id, prompt, context, candidates}
  let editing = false;      // true: changing a judgement made before (POST /api/change)
  let submissionId = null;  // one per prompt shown; a retry or a double click reuses it
  let busy = false;
  let dragging = null;

  // ---- helpers

  const { el, uuid4, api, withRetry, say, showContext } = window.llmtrainPage();  // static/common.js

  // ---- cards

  const cards = () => Array.from(list.querySelectorAll(":scope > .card"));

  function makeCard(c) {
    const li = el("li", "card");
    li.tabIndex = 0;
    li.draggable = true;
    li.dataset.idx = String(c.idx);
    li.dataset.label = c.label;
    li.dataset.tie = "0";
    const head = el("div", "card-head");
    const grip = el("span", "grip", "⠿");
    grip.setAttribute("aria-hidden", "true");
    head.append(el("span", "pos"), grip, el("span", "label", "Answer " + c.label));
    if (!c.finished) {
      const b = el("span", "badge", "cut off");
      b.title = `Stopped at the token limit (${c.n_tokens} tokens)`;
      head.append(b);
    }
    head.append(el("span", "spacer"));
    const tie = el("button", "tie", "= tie");
    tie.type = "button";
    tie.tabIndex = -1;
    tie.title = "Equally good as the answer above (key T)";
    tie.addEventListener("click", () => toggleTie(li));
    const up = el("button", "move up", "↑");
    const down = el("button", "move down", "↓");
    for (const [b, d, t] of [[up, -1, "Move up (Alt+↑)"], [down, 1, "Move down (Alt+↓)"]]) {
      b.type = "button";
      b.tabIndex = -1;
      b.title = t;
      b.setAttribute("aria-label", `${t.split(" (")[0]}: answer ${c.label}`);
      b.addEventListener("click", () => moveTo(li, cards().indexOf(li) + d));
    }
    head.append(tie, up, down);
    li.append(head, el("div", "text", c.text));
    return li;
  }

  // An answer's place is its tier (best = 1; tied answers share a place): the number on its
  // badge, in its aria-label and in the status line alike.
  function refresh() {
    const cs = cards();
    let tier = 0;
    cs.forEach((c, i) => {
      if (i === 0) c.dataset.tie = "0";
      const tied = c.dataset.tie === "1";
      if (!tied) tier += 1;
      c.dataset.place = String(tier);
      c.querySelector(".pos").textContent = String(tier);
      c.classList.toggle("tied", tied);
      const tie = c.querySelector(".tie");
      tie.setAttribute("aria-pressed", tied ? "true" : "false");
      tie.disabled = i === 0;
      c.querySelector(".up").disabled = i === 0;
      c.querySelector(".down").disabled = i === cs.length - 1;
      c.setAttribute("aria-label", `Answer ${c.dataset.label}, place ${tier}` +
        (tied ? `, tied with answer ${cs[i - 1].dataset.label}` : ""));
    });
  }

  function announce(card) {
    const cs = cards();
    const i = cs.indexOf(card);
    say(`Answer ${card.dataset.label} is now at place ${card.dataset.place}` +
      (card.dataset.tie === "1" ? ` (tied with answer ${cs[i - 1].dataset.label}).` : "."));
  }

  function moveTo(card, pos) {
    const cs = cards();
    const from = cs.indexOf(card);
    pos = Math.max(0, Math.min(cs.length - 1, pos));
    if (pos === from) return;
    card.dataset.tie = "0";  // a moved answer is no longer tied; the others keep their marks
    const rest = cs.filter((c) => c !== card);
    list.insertBefore(card, rest[pos] || null);
    refresh();
    card.focus({ preventScroll: false });
    announce(card);
  }

  function toggleTie(card) {
    if (cards().indexOf(card) === 0) return;
    card.dataset.tie = card.dataset.tie === "1" ? "0" : "1";
    refresh();
    announce(card);
  }

  function tiers() {  // best first; each tier lists ORIGINAL candidate indices
    const out = [];
    cards().forEach((c, i) => {
      const idx = parseInt(c.dataset.idx, 10);
      if (i > 0 && c.dataset.tie === "1") out[out.length - 1].push(idx);
      else out.push([idx]);
    });
    return out;
  }

  // keyboard: on the focused card
  list.addEventListener("keydown", (e) => {
    const card = e.target.closest && e.target.closest(".card");
    if (!card || e.target !== card) return;
    const cs = cards();
    const i = cs.indexOf(card);
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      const d = e.key === "ArrowUp" ? -1 : 1;
      e.preventDefault();
      if (e.altKey || e.shiftKey) moveTo(card, i + d);
      else if (cs[i + d]) cs[i + d].focus();
    } else if (/^[1-9]$/.test(e.key) && !e.ctrlKey && !e.metaKey && !e.altKey) {
      e.preventDefault();
      if (+e.key <= cs.length) moveTo(card, +e.key - 1);
    } else if (e.key === "t" || e.key === "T" || e.key === "=") {
      e.preventDefault();
      toggleTie(card);
    } else if (e.key === "Home" || e.key === "End") {
      e.preventDefault();
      cs[e.key === "Home" ? 0 : cs.length - 1].focus();
    }
  });

  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      send("ranked");
    }
  });

  // drag and drop (HTML5): the dragged card follows the pointer; a dropped card loses its tie mark
  function cardAfter(y) {
    for (const c of cards()) {
      if (c === dragging) continue;
      const r = c.getBoundingClientRect();
      if (y < r.top + r.height / 2) return c;
    }
    return null;
  }
  list.addEventListener("dragstart", (e) => {
    const card = e.target.closest && e.target.closest(".card");
    if (!card) return;
    dragging = card;
    card.classList.add("dragging");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", "Answer " + card.dataset.label);
  });
  list.addEventListener("dragover", (e) => {
    if (!dragging) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "move";
    const after = cardAfter(e.clientY);
    if (after !== dragging.nextElementSibling || (after === null && list.lastElementChild !== dragging)) {
      list.insertBefore(dragging, after);
    }
  });
  list.addEventListener("drop", (e) => { if (dragging) e.preventDefault(); });
  list.addEventListener("dragend", () => {
    if (!dragging) return;
    const card = dragging;
    dragging = null;
    card.classList.remove("dragging");
    card.dataset.tie = "0";
    refresh();
    card.focus({ preventScroll: true });
    announce(card);
  });

  // ---- prompts

  function showProgress(p) {
    if (!p) return;
    const judged = p.ranked + p.all_bad;
    $("progress").textContent = `${judged} of ${p.total} ranked` + (p.skipped ? ` · ${p.skipped} skipped` : "");
    $("bar-fill").style.width = p.total ? `${(100 * p.done) / p.total}%` : "0";
  }

  function render(view, judgement) {
    current = view;
    submissionId = uuid4();
    editing = !!judgement;
    $("prompt-id").textContent = "#" + view.id;
    const rnd = view.round || { n: 1, of: 1 };  // the same prompt asked again with fresh answers
    $("prompt-round").hidden = rnd.of <= 1;
    $("prompt-round").textContent = rnd.of > 1 ? `round ${rnd.n} of ${rnd.of}` : "";
    $("round-note").hidden = rnd.n <= 1;
    $("round-note").textContent = rnd.n > 1 ? `You may have seen this prompt before: this is round ${rnd.n}, with ` +
      "fresh answers. Rank these answers on their own." : "";
    showContext($("context"), view.context);
    $("prompt-text").textContent = view.prompt;
    let made = view.candidates.map(makeCard);
    if (judgement && judgement.status === "ranked") {
      const byIdx = new Map(made.map((c) => [parseInt(c.dataset.idx, 10), c]));
      const ordered = [];
      for (const tier of judgement.ranking) {
        const shown = made.filter((c) => tier.includes(parseInt(c.dataset.idx, 10)));
        shown.forEach((c, j) => { c.dataset.tie = j > 0 ? "1" : "0"; ordered.push(c); });
        tier.forEach((i) => byIdx.delete(i));
      }
      made = ordered.concat(Array.from(byIdx.values()));
    }
    list.replaceChildren(...made);
    refresh();
    $("submit").textContent = editing ? "Save change" : "Submit ranking";
    $("skip").textContent = editing ? "Mark skipped" : "Skip";
    $("cancel").hidden = !editing;
    if (judgement) say(`You judged this prompt before (${judgement.status.replace("_", " ")}); change it and save.`);
    window.scrollTo(0, 0);
    if (made[0]) made[0].focus({ preventScroll: true });
  }

  function showDone(p, closed, always) {
    current = null;
    if (p) showProgress(p);
    for (const sel of [".prompt", "#hint", "#cands", ".actions"]) root.querySelector(sel).hidden = true;
    // judged them all: "All done"; `always`: the server refused a write because the round is closed
    $(closed && (always || (p && p.done < p.total)) ? "closed" : "done").hidden = false;
  }

  async function loadNext() {
    const d = await withRetry(() => api("GET", "/api/next"));
    showProgress(d.progress);
    if (d.prompt) render(d.prompt, null);
    else showDone(d.progress, d.closed);
  }

  async function loadOne(id) {
    const d = await withRetry(() => api("GET", `/api/prompt/${id}`));
    showProgress(d.progress);
    if (d.closed) showDone(d.progress, true, true);  // nothing can be changed once the round is closed
    else render(d.prompt, d.judgement);
  }

  async function send(status) {
    if (busy || !current) return;
    busy = true;
    buttons.forEach((b) => { b.disabled = true; });
    const body = { prompt_id: current.id, status, ranking: status === "ranked" ? tiers() : null };
    try {
      if (editing) {
        await withRetry(() => api("POST", "/api/change", body));
        location.href = "/mine";
        return;
      }
      body.submission_id = submissionId;
      const r = await withRetry(() => api("POST", "/api/submit", body));
      const what = { ranked: "Ranking saved.", all_bad: "Marked all unacceptable.", skipped: "Skipped." }[status];
      await loadNext();
      say(r.duplicate ? "That one was recorded already." : what);
    } catch (e) {
      if (e.status === 409 && e.closed) showDone(null, true, true);  // an admin closed the round meanwhile
      say(e.message || String(e), true);
    } finally {
      busy = false;
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  $("submit").addEventListener("click", () => send("ranked"));
  $("allbad").addEventListener("click", () => send("all_bad"));
  $("skip").addEventListener("click", () => send("skipped"));

  (editId !== null ? loadOne(editId) : loadNext()).catch((e) => say(e.message || String(e), true));
})();
