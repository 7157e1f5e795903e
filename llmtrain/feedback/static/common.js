// Shared by the app's pages (rank.js, arena.js): a DOM helper, client-made submission ids, JSON
// calls that carry the CSRF token (fetching a fresh one once after a server restart), and retries
// of the same request on connection errors and 503. `say(text, isError)` shows a status line.
// Model text is only ever put into the page with textContent: never innerHTML.
"use strict";
window.llmtrainPage = function (say) {
  let csrf = document.querySelector('meta[name="csrf-token"]').content;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function uuid4() {  // crypto.randomUUID needs a secure context; getRandomValues does not
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  async function api(method, url, body, retried) {
    const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-CSRF-Token"] = csrf;
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(url, opts);
    if (r.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("Signed out.");
    }
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 403 && data.csrf && !retried) {  // e.g. the server restarted: fetch a fresh token once
      csrf = (await api("GET", "/api/session")).csrf;
      return api(method, url, body, true);
    }
    if (!r.ok) {
      const err = new Error(data.error || `The server answered ${r.status}.`);
      err.status = r.status;
      err.closed = !!data.closed;
      throw err;
    }
    return data;
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

  return { el, uuid4, api, withRetry };
};
