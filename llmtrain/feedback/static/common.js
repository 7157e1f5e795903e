// What the app's pages share (rank.js, arena.js, chat.js): making elements (text only ever
// through textContent, never innerHTML) and calling the server with the page's CSRF token. A
// write refused for its CSRF token (the server restarted: a new key) fetches a fresh token and is
// sent once more; a 401 goes to the sign-in page; say() fills the page's #status line.
// window.llmtrainPage() adds what the pages that submit judgements need: client-made submission
// ids, and retries of the same request on connection errors and 503, saying so on the status line.
"use strict";
window.LT = (function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  let csrf = meta ? meta.content : "";

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // fetch(url), with the CSRF token on a write and `body` as JSON if given; opts: {accept, signal}.
  // -> the Response (any status but 401).
  async function send(method, url, body, opts, retried) {
    const o = opts || {};
    const init = { method, headers: { Accept: o.accept || "application/json" }, credentials: "same-origin",
      signal: o.signal };
    if (method !== "GET") init.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(url, init);
    if (r.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("Signed out.");
    }
    if (r.status === 403 && !retried) {  // e.g. the server restarted: fetch a fresh token once
      let data = {};
      try { data = await r.clone().json(); } catch (e) { /* not JSON */ }
      if (data.csrf) {
        csrf = (await api("GET", "/api/session")).csrf;
        return send(method, url, body, opts, true);
      }
    }
    return r;
  }

  // The one-line error of a refused request, as an Error with .status (and .closed: the round is closed).
  async function failure(r) {
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    const err = new Error(data.error || `The server answered ${r.status}.`);
    err.status = r.status;
    err.closed = !!data.closed;
    return err;
  }

  // A JSON call -> its JSON answer; a refusal throws failure(r).
  async function api(method, url, body) {
    const r = await send(method, url, body);
    if (!r.ok) throw await failure(r);
    try { return await r.json(); } catch (e) { return {}; }
  }

  // The page's status line (#status): a message, or an error in the error colour.
  function say(text, isError) {
    const s = document.getElementById("status");
    s.textContent = text || "";
    s.classList.toggle("error", !!isError);
  }

  // The earlier turns of a prompt's conversation into `box` (#context): role and text of each.
  function showContext(box, messages) {
    box.replaceChildren();
    for (const m of messages) {
      const d = el("div", "msg");
      d.append(el("span", "role", m.role), el("div", "text", m.content));
      box.append(d);
    }
  }

  return { el, send, failure, api, say, showContext };
})();

window.llmtrainPage = function () {
  const say = LT.say;
  function uuid4() {  // crypto.randomUUID needs a secure context; getRandomValues does not
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  async function withRetry(fn) {  // connection errors only; same request (same submission id) each time
    const waits = [500, 1000, 2000, 3000, 5000, 8000];
    for (let i = 0; ; i++) {
      try {
        return await fn();
      } catch (e) {
        const busyDb = e.status === 503;  // the database is busy: the same request again shortly
        if (!(e instanceof TypeError || busyDb) || i >= waits.length) throw e;
        say(busyDb ? `The server is busy; trying again (${i + 1}/${waits.length})…`
          : `Cannot reach the server; trying again (${i + 1}/${waits.length})…`, true);
        await new Promise((res) => setTimeout(res, waits[i]));
      }
    }
  }

  return { el: LT.el, uuid4, api: LT.api, withRetry, say, showContext: LT.showContext };
};
