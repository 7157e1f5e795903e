// The blind arena: one prompt, two models' answers on sides A and B (the server draws the sides
// per annotator), a vote (A, B, tie, both bad), and only then the models' names. One submission
// id per match shown: a double click or a retried request records the vote once.
// Model text is only ever put into the page with textContent: never innerHTML.
"use strict";
(function () {
  const root = document.getElementById("arena");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const voteButtons = Array.from(document.querySelectorAll("#votes button[data-vote]"));
  const openId = root.dataset.match ? parseInt(root.dataset.match, 10) : null;

  let current = null;       // the match shown: {id, prompt_id, prompt, context, own, answers}
  let submissionId = null;  // one per match shown; a retry or a double click reuses it
  let voted = false;
  let busy = false;

  const { uuid4, api, withRetry, say, showContext } = window.llmtrainPage();  // static/common.js

  function showProgress(p) {
    if (!p) return;
    $("progress").textContent = `${p.voted} of ${p.total} matches voted`;
    $("bar-fill").style.width = p.total ? `${(100 * p.voted) / p.total}%` : "0";
  }

  function render(m) {
    current = m;
    submissionId = uuid4();
    voted = false;
    root.dataset.shown = String(m.id);
    $("prompt-id").textContent = "#" + m.prompt_id;
    $("own").hidden = !m.own;
    showContext($("context"), m.context);
    $("prompt-text").textContent = m.prompt;
    for (const a of m.answers) {
      $("text-" + a.side).textContent = a.text;
      $("cut-" + a.side).hidden = a.finished;
      $("cut-" + a.side).title = `Stopped at the token limit (${a.n_tokens} tokens)`;
      $("model-" + a.side).hidden = true;
      $("model-" + a.side).textContent = "";
      $("side-" + a.side).classList.remove("chosen");
    }
    for (const sel of [".prompt", "#hint", ".duel", "#votes"]) root.querySelector(sel).hidden = false;
    $("after").hidden = true;
    say("");
    window.scrollTo(0, 0);
  }

  function showVote(vote, reveal, note) {
    voted = true;
    for (const side of ["A", "B"]) {
      $("model-" + side).textContent = reveal[side];
      $("model-" + side).hidden = false;
      $("side-" + side).classList.toggle("chosen", vote === side.toLowerCase());
    }
    const what = { a: `You preferred A (${reveal.A}).`, b: `You preferred B (${reveal.B}).`,
      tie: "You called it a tie.", both_bad: "You found both answers bad." }[vote];
    $("reveal").textContent = `A was ${reveal.A}, B was ${reveal.B}. ${what}`;
    $("votes").hidden = true;
    $("after").hidden = false;
    $("next").focus();
    if (note) say(note);
  }

  function showDone(p, closed) {
    current = null;
    if (p) showProgress(p);
    for (const sel of [".prompt", "#hint", ".duel", "#votes", "#after"]) root.querySelector(sel).hidden = true;
    $(closed ? "closed" : "done").hidden = false;
  }

  async function loadNext() {
    const d = await withRetry(() => api("GET", "/api/arena/next"));
    showProgress(d.progress);
    if (d.match) render(d.match);
    else showDone(d.progress, d.closed);
  }

  async function loadOne(id) {
    const d = await withRetry(() => api("GET", `/api/arena/match/${id}`));
    showProgress(d.progress);
    if (d.closed && !d.vote) return showDone(d.progress, true);
    render(d.match);
    if (d.vote) showVote(d.vote.vote, d.vote.reveal, "You voted on this match before.");
  }

  async function vote(v) {
    if (busy || !current || voted) return;
    busy = true;
    voteButtons.forEach((b) => { b.disabled = true; });
    const body = { match_id: current.id, prompt_id: current.prompt_id, vote: v, submission_id: submissionId };
    try {
      const r = await withRetry(() => api("POST", "/api/arena/vote", body));
      showProgress(r.progress);
      showVote(r.vote, r.reveal, r.duplicate ? "That vote was recorded already." : "Vote saved.");
    } catch (e) {
      if (e.status === 409 && e.closed) showDone(null, true);  // an admin closed the round meanwhile
      say(e.message || String(e), true);
    } finally {
      busy = false;
      voteButtons.forEach((b) => { b.disabled = false; });
    }
  }

  voteButtons.forEach((b) => b.addEventListener("click", () => vote(b.dataset.vote)));
  $("next").addEventListener("click", () => {
    if (openId !== null) location.href = "/arena";  // a match opened by its number: on to the queue
    else loadNext().catch((e) => say(e.message || String(e), true));
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || (e.target.closest && e.target.closest("textarea, input"))) return;
    const key = e.key.toLowerCase();
    const v = { a: "a", b: "b", t: "tie", x: "both_bad" }[key];
    if (v && !voted) { e.preventDefault(); vote(v); }
    else if (key === "n" && voted) { e.preventDefault(); $("next").click(); }
  });

  const ask = $("ask");  // a person's own prompt: only when the server has a model worker
  if (ask) {
    ask.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (busy) return;
      busy = true;
      $("ask-send").disabled = true;
      say("The models are answering…");
      try {
        const r = await api("POST", "/api/arena/ask", { prompt: $("ask-text").value });
        $("ask-text").value = "";
        $("done").hidden = true;
        render(r.match);
      } catch (err) {
        say(err.message || String(err), true);
      } finally {
        busy = false;
        $("ask-send").disabled = false;
      }
    });
  }

  (openId !== null ? loadOne(openId) : loadNext()).catch((e) => say(e.message || String(e), true));
})();
