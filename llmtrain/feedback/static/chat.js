// The chat page: talk to a model; its answer streams in, token by token, as server-sent events
// read from the fetch of POST /api/chat (EventSource cannot POST or send the CSRF header).
// The conversation lives in this page and is sent with every message; the server says how many
// of the oldest messages it had to leave out to fit the model's context window, and those are
// greyed out and not sent again. Stop asks the server to stop (the model stops generating);
// leaving the page closes the stream, which stops it too.
// Model text is only ever put into the page with textContent: never innerHTML. Needs common.js.
"use strict";
(function () {
  const root = document.getElementById("chat");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const { el, send, failure, api, say } = LT;  // static/common.js
  const log = $("log");
  let history = [];  // {role, content, node}: what the next request sends
  let job = null;    // the answer under way: {id, controller}
  let droppedTotal = 0;

  function setBusy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
    root.dataset.busy = on ? "1" : "0";
  }

  function addMessage(role, text) {
    const d = el("div", "msg " + role);
    d.append(el("span", "role", role === "user" ? "You" : $("model").value), el("div", "text", text));
    log.append(d);
    d.scrollIntoView({ block: "end" });
    return d;
  }

  // The oldest `dropped` messages of those just sent no longer fit: grey them out, send them no more.
  function leaveOut(d) {
    const notes = [];
    if (d.dropped > 0) {
      history.slice(0, d.dropped).forEach((m) => m.node.classList.add("dropped"));
      history = history.slice(d.dropped);
      droppedTotal += d.dropped;
    }
    if (droppedTotal > 0) {
      notes.push(`${droppedTotal} older message${droppedTotal === 1 ? "" : "s"} no longer fit the model's ` +
        `context window (${d.ctx} tokens, ${d.room} of them for the conversation) and ` +
        `${droppedTotal === 1 ? "was" : "were"} left out: greyed out above.`);
    }
    if (d.cut) notes.push("Your message alone is longer than that: the model sees only its last part.");
    $("note").textContent = notes.join(" ");
    $("note").hidden = notes.length === 0;
  }

  // The server-sent events of a fetch Response: [event, data] pairs.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        let ev = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) ev = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) yield [ev, JSON.parse(data)];
      }
    }
  }

  function request() {
    return {
      model: $("model").value,
      messages: history.map((m) => ({ role: m.role, content: m.content })),
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_new_tokens: Number($("max-new-tokens").value),
    };
  }

  // Stream one answer into `out`; -> the last event ("done" or "stopped") and its data. Throws on an error.
  async function stream(out) {
    const r = await send("POST", "/api/chat", request(), { accept: "text/event-stream", signal: job.controller.signal });
    if (!r.ok) throw await failure(r);
    for await (const [ev, d] of events(r)) {
      if (ev === "queued") {
        job.id = d.id;
        say(d.ahead ? `Waiting for the model (${d.ahead} answer${d.ahead === 1 ? "" : "s"} ahead)…` : "Thinking…");
      } else if (ev === "start") {
        leaveOut(d);
        say("Answering…");
      } else if (ev === "token") {
        out.textContent += d.text;
      } else if (ev === "done" || ev === "stopped") {
        out.textContent = d.text;
        return [ev, d];
      } else if (ev === "error") {
        throw new Error(d.error);
      }
    }
    throw new Error("The answer broke off (the connection to the server closed).");
  }

  async function ask() {
    const text = $("input").value;
    if (job || !text.trim()) return;
    const user = { role: "user", content: text, node: addMessage("user", text) };
    history.push(user);
    $("input").value = "";
    const node = addMessage("assistant", "");
    node.classList.add("streaming");
    const out = node.querySelector(".text");
    job = { id: null, controller: new AbortController() };
    setBusy(true);
    try {
      const [ev, d] = await stream(out);
      if (ev === "stopped" && !d.text) throw new Error("Stopped before the model wrote anything.");
      history.push({ role: "assistant", content: d.text, node });
      say(ev === "stopped" ? `Stopped after ${d.n_tokens} token${d.n_tokens === 1 ? "" : "s"}.`
        : d.finished ? "Done." : `Done: cut off at the limit of ${d.n_tokens} new tokens.`);
    } catch (e) {  // not answered: the message goes back into the box, to send again
      node.remove();
      user.node.remove();
      history = history.filter((m) => m !== user);
      $("input").value = text;
      say(e.name === "AbortError" ? "Stopped." : e.message || String(e), e.name !== "AbortError");
    } finally {
      node.classList.remove("streaming");
      job = null;
      setBusy(false);
      $("input").focus();
    }
  }

  async function stop() {
    if (!job) return;
    if (!job.id) {  // not queued yet: closing the stream stops it on the server
      job.controller.abort();
      return;
    }
    say("Stopping…");
    try {
      await api("POST", `/api/chat/${encodeURIComponent(job.id)}/stop`);
    } catch (e) {
      if (e.status !== 404) job.controller.abort();  // 404: it ended meanwhile
    }
  }

  function newChat() {
    if (job) job.controller.abort();
    history = [];
    droppedTotal = 0;
    log.replaceChildren();
    $("note").hidden = true;
    say("");
    $("input").focus();
  }

  $("send").addEventListener("click", ask);
  $("stop").addEventListener("click", stop);
  $("new").addEventListener("click", newChat);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ask();
    }
  });
  setBusy(false);
})();
