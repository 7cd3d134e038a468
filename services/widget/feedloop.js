/*! feedloop widget: like / dislike feedback on LLM answers. No dependencies. Apache-2.0. */
(() => {
  if (window.FeedLoop) return;
  const doc = document;
  const src = doc.currentScript?.src;
  // Default endpoint: the origin this script came from (the feedloop API).
  const ORIGIN = src ? new URL(src, location.href).origin : location.origin;
  // Thumbs-up icon from Feather (MIT); the dislike button shows it rotated.
  const THUMB =
    '<svg viewBox="0 0 24 24" width="16" height="16" fill="none" stroke="currentColor" stroke-width="2" ' +
    'stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="M14 9V5a3 3 0 0 0-3-3' +
    'l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"/></svg>';
  const LABELS = {
    group: "Rate this answer", like: "Like this answer", dislike: "Dislike this answer",
    more: "Tell us more", comment: "Comment (optional)", correction: "Suggest a better answer",
    send: "Send", retry: "Retry", sending: "Sending\u2026", thanks: "Thanks for your feedback",
    withdrawn: "Your rating was removed", noted: "Thanks, your note was sent", failed: "Couldn't send your feedback.",
  };
  const ERRORS = { 403: "Not allowed.", 404: "Unknown answer.", 410: "Rating has closed.", 413: "Too long." };
  const v = (name, dflt) => `var(--feedloop-${name},${dflt})`;
  const ACCENT = v("accent", "#2563eb");
  const CSS = `.feedloop{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin-top:8px;color:${v("fg", "#1f2937")};
font:${v("font-size", "13px")}/1.4 ${v("font", "system-ui,sans-serif")}}
.fl-btn,.fl-form textarea{font:inherit;color:inherit;background:${v("bg", "#fff")};padding:4px 9px;resize:vertical;
border:1px solid ${v("border", "#d1d5db")};border-radius:${v("radius", "8px")}}
.fl-btn{display:inline-flex;align-items:center;min-height:28px;cursor:pointer}
.fl-btn:hover{border-color:${ACCENT}}
.fl-btn:focus-visible,.fl-form textarea:focus-visible,.fl-more summary:focus-visible{outline:2px solid ${ACCENT};outline-offset:2px}
.fl-btn[aria-pressed=true],.fl-send{background:${ACCENT};border-color:${ACCENT};color:${v("on-accent", "#fff")}}
.fl-down svg{transform:rotate(180deg)}
.fl-status,.fl-more summary{color:${v("muted", "#6b7280")}}
.feedloop[data-state=error] .fl-status{color:${v("danger", "#b91c1c")}}
.feedloop [hidden]{display:none!important}
.fl-more{flex-basis:100%}.fl-more summary{cursor:pointer}
.fl-form{display:flex;flex-direction:column;align-items:flex-start;gap:6px;margin-top:6px}
.fl-form label{display:flex;flex-direction:column;gap:3px;align-self:stretch}`;

  const el = (tag, attrs, ...children) => {
    const node = doc.createElement(tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    node.append(...children);
    return node;
  };

  // Retried: network failures (a TypeError, CORS refusals included), 5xx and 429.
  const retryable = (err) => !err.status || err.status >= 500 || err.status === 429;

  async function request(method, url, body) {
    const headers = { Accept: "application/json" };
    if (body) headers["Content-Type"] = "application/json";
    const res = await fetch(url, { method, headers, credentials: "omit", body: body && JSON.stringify(body) });
    if (!res.ok) throw Object.assign(new Error(`HTTP ${res.status}`), { status: res.status });
    return res.json().catch(() => ({}));
  }

  async function withRetry(fn, tries, baseMs) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        if (attempt >= tries || !retryable(err)) throw err;
        const wait = baseMs * 2 ** (attempt - 1) * (0.8 + Math.random() * 0.4); // exponential, jittered
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  function attach(element, options) {
    if (element._feedloop) return element._feedloop;
    const o = { endpoint: ORIGIN, retries: 4, retryDelay: 500, ...options };
    if (!o.completionId || !o.token) throw new Error("FeedLoop.attach needs completionId and token");
    const L = { ...LABELS, ...o.labels };
    const base = String(o.endpoint).replace(/\/+$/, "") + "/v1/feedback";
    const url = `${base}/${encodeURIComponent(o.completionId)}`;
    const who = o.user ? { user: String(o.user) } : {};
    const state = { rating: null, comment: null, correction: null };
    let busy = false;
    let touched = false; // a vote was sent: the first GET's answer is stale
    let pending = null; // [operation, success text] for the retry button

    if (!doc.getElementById("feedloop-style")) {
      // First in <head>: the host page's rules win at equal specificity.
      doc.head.prepend(el("style", { id: "feedloop-style" }, CSS));
    }
    const root = el("div", { class: "feedloop", role: "group", "aria-label": L.group, "data-state": "loading" });
    const button = (cls, attrs, ...kids) => el("button", { type: "button", class: "fl-btn fl-" + cls, ...attrs }, ...kids);
    const up = button("up", { "aria-label": L.like });
    const down = button("down", { "aria-label": L.dislike });
    up.innerHTML = down.innerHTML = THUMB;
    // <details>: a disclosure with native keyboard and screen-reader support.
    const form = el("form", { class: "fl-form" });
    const more = el("details", { class: "fl-more", hidden: "" }, el("summary", {}, L.more), form);
    const status = el("span", { class: "fl-status", role: "status", "aria-live": "polite" });
    const retry = button("retry", { hidden: "" }, L.retry);
    const box = (on, name) => {
      const area = on ? el("textarea", { name, rows: "3" }) : null;
      if (area) form.append(el("label", {}, L[name], area));
      return area;
    };
    const comment = box(o.comment, "comment");
    const correction = box(o.correction, "correction");
    form.append(el("button", { type: "submit", class: "fl-btn fl-send" }, L.send));
    root.append(up, down, status, retry, more);
    element.append(root);

    const press = (rating) => {
      up.setAttribute("aria-pressed", rating === "like");
      down.setAttribute("aria-pressed", rating === "dislike");
    };
    function render() {
      const r = state.rating;
      press(r);
      if (correction) correction.parentNode.hidden = r !== "dislike";
      more.hidden = !(r && (comment || (correction && r === "dislike")));
      if (more.hidden) more.open = false;
    }
    function setStatus(phase, text, canRetry) {
      root.setAttribute("data-state", phase);
      status.textContent = text || "";
      retry.hidden = !canRetry;
    }
    function apply(data) {
      for (const k in state) state[k] = data[k] || null; // the server's state: what was sent replaced it
      render();
    }

    async function run(op, okText) {
      if (busy) return;
      busy = touched = true;
      pending = [op, okText];
      setStatus("sending", L.sending);
      try {
        apply(await withRetry(op, o.retries, o.retryDelay));
        pending = null;
        setStatus("saved", okText);
        const detail = { completionId: o.completionId, ...state };
        o.onChange?.(detail);
        element.dispatchEvent(new CustomEvent("feedloop:change", { bubbles: true, detail }));
      } catch (err) {
        render();
        setStatus("error", ERRORS[err.status] || L.failed, retryable(err));
      } finally {
        busy = false;
      }
    }
    const post = (fields) => async () => ({
      ...fields,
      ...(await request("POST", base, { completion_id: o.completionId, token: o.token, ...fields, ...who })),
    });

    async function vote(rating) {
      if (busy) return;
      if (state.rating === rating) return run(() => request("DELETE", url, { token: o.token, ...who }), L.withdrawn);
      press(rating); // while sending; render() restores the confirmed rating on failure
      await run(post({ rating }), L.thanks);
      if (state.rating === "dislike" && correction) more.open = true;
    }

    up.addEventListener("click", () => vote("like"));
    down.addEventListener("click", () => vote("dislike"));
    // The retry button hides on success: keep the focus in the widget.
    retry.addEventListener("click", () => pending && run(...pending).then(() => retry.hidden && up.focus()));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      // Empty or hidden boxes give undefined, which JSON.stringify leaves out.
      const text = (area) => (area && !area.parentNode.hidden && area.value.trim()) || undefined;
      await run(post({ rating: state.rating, comment: text(comment), correction: text(correction) }), L.noted);
      if (!pending) more.open = false;
    });

    request("GET", url + "?token=" + encodeURIComponent(o.token) + (o.user ? "&user=" + encodeURIComponent(o.user) : ""))
      .then((data) => {
        if (touched) return;
        apply(data);
        for (const area of [comment, correction]) if (area) area.value = state[area.name] || "";
      })
      .catch(() => {}) // unknown state: voting still works
      .then(() => touched || setStatus("ready"));

    render();
    return (element._feedloop = root);
  }

  const flag = (value) => value !== undefined && value !== "false";

  function scan(root = doc) {
    const found = [...root.querySelectorAll("[data-feedloop-completion]")];
    if (root.matches?.("[data-feedloop-completion]")) found.unshift(root);
    return found.map((node) => {
      const d = node.dataset;
      if (!d.feedloopToken) return console.warn("feedloop: no token on", node);
      return attach(node, {
        completionId: d.feedloopCompletion,
        token: d.feedloopToken,
        endpoint: d.feedloopEndpoint || ORIGIN,
        user: d.feedloopUser,
        comment: flag(d.feedloopComment),
        correction: flag(d.feedloopCorrection),
      });
    });
  }

  window.FeedLoop = { version: "1.0.0", attach, scan };
  if (doc.readyState === "loading") doc.addEventListener("DOMContentLoaded", () => scan());
  else scan();
})();
