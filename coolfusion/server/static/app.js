/* Cool-Fusion chat page: plain JS, no build step, no dependencies.
 *
 * Talks to the server exactly as an outside OpenAI client would: GET /v1/models, then
 * POST /v1/chat/completions with stream: true and "fusion": {"trace": true}, read as
 * server-sent events from fetch(). Every content chunk carries `fusion_step` (the segment,
 * its winner and every candidate with each model's perplexity); the page colours each
 * segment by the model(s) that proposed the winning candidate and keeps a tally.
 * Stop aborts the fetch; the server sees the disconnect and cancels the generation.
 * The API key (if the server wants one) lives in localStorage and goes out as Bearer.
 */
(() => {
  "use strict";

  const VARIANTS = {
    "cool-fusion": "Fused: every model proposes up to a common word boundary; lowest mean perplexity wins",
    "cool-fusion-rerank": "Fused: rerank each model's whole answer plus Cool-Fusion's",
    "rerank": "Fused: each model answers alone; all score all answers; lowest mean perplexity wins",
    "cool-fusion-noalign": "Fused (ablation): each model stops at its own word boundary",
  };
  const EXAMPLES = [
    "Explain photosynthesis in two sentences.",
    "Write a haiku about a river at night.",
    "What is the capital of Australia?",
    "Give three tips for learning to cook.",
  ];
  const PALETTE = 6; // --m0 .. --m5 in style.css
  const STATUS_TEXT = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
  };

  // ---- small helpers ----------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (v == null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") for (const [p, val] of Object.entries(v)) node.style.setProperty(p, val);
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  const store = {
    get(key, fallback) {
      try {
        const v = localStorage.getItem("coolfusion." + key);
        return v == null ? fallback : JSON.parse(v);
      } catch { return fallback; }
    },
    set(key, value) {
      try { localStorage.setItem("coolfusion." + key, JSON.stringify(value)); } catch { /* private mode */ }
    },
  };

  function fmtPpl(v) {
    if (v == null) return "∞";
    if (!Number.isFinite(v)) return "∞";
    if (v < 100) return v.toFixed(2);
    if (v < 10000) return v.toFixed(1);
    return v.toExponential(2);
  }

  /** The text with its spaces and newlines made visible (for candidates). */
  function visibleText(text) {
    const frag = document.createDocumentFragment();
    if (text === "") {
      frag.append(el("span", { class: "ws", text: "(empty: end of answer)" }));
      return frag;
    }
    for (const part of text.split(/( |\n|\t)/)) {
      if (part === " ") frag.append(el("span", { class: "ws", text: "·" }));
      else if (part === "\n") frag.append(el("span", { class: "ws", text: "↵" }), "\n");
      else if (part === "\t") frag.append(el("span", { class: "ws", text: "→" }));
      else if (part) frag.append(part);
    }
    return frag;
  }

  // ---- state --------------------------------------------------------------------------------

  const app = {
    apiKey: store.get("apiKey", ""),
    models: [],
    sources: [],
    colors: new Map(), // proposer name -> palette index
    panes: [],
    busy: false,
  };

  const ui = {
    panes: $("#panes"),
    banner: $("#banner"),
    prompt: $("#prompt"),
    composer: $("#composer"),
    send: $("#send"),
    stop: $("#stop"),
    system: $("#system"),
    temperature: $("#temperature"),
    topP: $("#top-p"),
    maxTokens: $("#max-tokens"),
    sideBySide: $("#side-by-side"),
    legend: $("#legend"),
    popover: $("#popover"),
    keyDialog: $("#key-dialog"),
    keyInput: $("#api-key"),
    keyError: $("#key-error"),
    keyLabel: $("#key-label"),
    keyButton: $("#key-button"),
  };

  function colorIndex(name) {
    if (!app.colors.has(name)) {
      app.colors.set(name, app.colors.size % PALETTE);
      renderLegend();
    }
    return app.colors.get(name);
  }
  const colorOf = (name) => `var(--m${colorIndex(name)})`;

  function mixedBackground(names) {
    const stops = names.map((n) => `color-mix(in srgb, ${colorOf(n)} var(--tint), transparent)`);
    return `linear-gradient(100deg, ${stops.join(", ")})`;
  }

  // ---- errors -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, statusText, error, where) {
      super((error && error.message) || statusText || "request failed");
      this.status = status;
      this.statusText = statusText;
      this.type = error && error.type;
      this.code = error && error.code;
      this.param = error && error.param;
      this.where = where;
    }
    get title() {
      if (this.status == null) return this.where === "stream" ? "Error during the stream" : "Error";
      return `${this.status} ${this.statusText || STATUS_TEXT[this.status] || ""}`.trim();
    }
    get meta() {
      return [this.type, this.code, this.param && `param: ${this.param}`].filter(Boolean).join(" · ");
    }
  }

  async function errorFrom(res) {
    const text = await res.text().catch(() => "");
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON */ }
    const err = body && body.error ? body.error : { message: text || res.statusText || "request failed" };
    const e = new ApiError(res.status, res.statusText || STATUS_TEXT[res.status], err);
    e.retryAfter = Number(res.headers.get("Retry-After")) || null;
    return e;
  }

  function asApiError(e) {
    if (e instanceof ApiError) return e;
    const err = new ApiError(null, "", { message: `${e.message || e} (is the server running?)` });
    Object.defineProperty(err, "title", { value: "Network error" });
    return err;
  }

  function errorBox(e) {
    e = asApiError(e);
    return el("div", { class: "error", "data-status": e.status == null ? "" : String(e.status) },
      el("strong", { text: e.title }),
      el("span", { class: "error-msg", text: e.message }),
      e.meta ? el("span", { class: "error-meta mono", text: e.meta }) : null);
  }

  function showBanner(e) {
    ui.banner.replaceChildren(errorBox(e));
    ui.banner.hidden = false;
  }
  const hideBanner = () => { ui.banner.hidden = true; ui.banner.replaceChildren(); };

  // ---- the API --------------------------------------------------------------------------------

  function apiHeaders(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (app.apiKey) h.Authorization = "Bearer " + app.apiKey;
    return h;
  }

  async function fetchModels() {
    const res = await fetch("/v1/models", { headers: apiHeaders(false) });
    if (!res.ok) throw await errorFrom(res);
    const body = await res.json();
    return body.data.map((m) => m.id);
  }

  /** POST a streaming chat completion; onChunk(obj) for every data payload until [DONE]. */
  async function streamChat(body, signal, onChunk) {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(true), body: JSON.stringify(body), signal,
    });
    if (!res.ok) throw await errorFrom(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    const boundary = /\r?\n\r?\n/;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = boundary.exec(buf))) {
        const event = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue; // a comment / ping
        if (data === "[DONE]") { reader.cancel().catch(() => {}); return; }
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(null, "", obj.error, "stream");
        onChunk(obj);
      }
    }
    throw new ApiError(null, "", { message: "the stream ended before [DONE]" }, "stream");
  }

  // ---- a chat pane ------------------------------------------------------------------------------

  const segInfo = new WeakMap(); // segment span -> {step, index, model}

  class Pane {
    constructor(slot) {
      this.slot = slot;
      this.root = $("#pane-template").content.firstElementChild.cloneNode(true);
      this.root.dataset.slot = String(slot);
      this.select = $(".model", this.root);
      this.messages = $(".messages", this.root);
      this.tallyBar = $(".tally-bar", this.root);
      this.tallyCounts = $(".tally-counts", this.root);
      this.history = [];
      this.controller = null;
      this.resetTally();
      this.desc = $(".model-desc", this.root);
      this.select.addEventListener("change", () => {
        store.set(`model${slot}`, this.select.value);
        this.describe();
      });
      const examples = $(".examples", this.root);
      for (const text of EXAMPLES) {
        examples.append(el("button", { type: "button", class: "example", text, onclick: () => sendPrompt(text) }));
      }
    }

    get model() { return this.select.value; }

    setModels(ids, fallback) {
      const want = this.select.value || store.get(`model${this.slot}`, fallback);
      const fused = el("optgroup", { label: "Fused" });
      const single = el("optgroup", { label: "Single models" });
      for (const id of ids) {
        const opt = el("option", { value: id, text: id, title: VARIANTS[id] || "single model, no fusion" });
        (id in VARIANTS ? fused : single).append(opt);
      }
      this.select.replaceChildren(...[fused, single].filter((g) => g.children.length));
      this.select.value = ids.includes(want) ? want : (ids.includes(fallback) ? fallback : ids[0] || "");
      this.describe();
    }

    describe() {
      const text = VARIANTS[this.select.value] || "Single model: no fusion, every segment is its own";
      this.select.title = text;
      this.desc.textContent = text;
      this.desc.title = text;
    }

    reset() {
      this.history = [];
      this.messages.querySelectorAll(".msg").forEach((n) => n.remove());
      this.root.classList.remove("has-messages");
      this.resetTally();
    }

    resetTally() {
      this.tally = { wins: new Map(), agreed: 0, total: 0 };
      this.renderTally();
    }

    count(step, by, agreed) {
      if (agreed) this.tally.agreed += 1;
      else for (const n of by) this.tally.wins.set(n, (this.tally.wins.get(n) || 0) + 1);
      this.tally.total += 1;
      this.renderTally();
    }

    renderTally() {
      const { wins, agreed, total } = this.tally;
      const pct = (k) => el("small", { text: `${Math.round((100 * k) / total)}%` });
      const names = [...wins.keys()].sort((a, b) => colorIndex(a) - colorIndex(b));
      const bar = [];
      const counts = [];
      for (const n of names) {
        const w = wins.get(n);
        bar.push(el("span", { style: { "--c": colorOf(n), flex: String(w) }, title: `${n}: ${w}` }));
        counts.push(el("span", { class: "tally-item", "data-model": n, title: `segments won by ${n}` },
          el("i", { class: "dot", style: { "--c": colorOf(n) } }), `${n} `, el("b", { text: String(w) }), pct(w)));
      }
      if (agreed) {
        const sw = this.agreedSwatch();
        bar.push(el("span", { class: "agreed", style: { flex: String(agreed), "--seg-bg": sw } , title: `agreed: ${agreed}` }));
        counts.push(el("span", { class: "tally-item", "data-model": "agreed", title: "segments every model proposed identically" },
          el("i", { class: "dot agreed", style: { "--seg-bg": sw } }), "agreed ", el("b", { text: String(agreed) }), pct(agreed)));
      }
      if (!total) counts.push(el("span", { class: "muted", text: "no segments yet" }));
      this.tallyBar.replaceChildren(...bar);
      this.tallyCounts.replaceChildren(...counts);
      this.root.dataset.segments = String(total);
    }

    agreedSwatch() {
      return mixedBackground(app.sources.length > 1 ? app.sources : ["agreed-a", "agreed-b"]);
    }

    scrollToEnd(force) {
      const m = this.messages;
      if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
    }

    addUser(text) {
      this.root.classList.add("has-messages");
      this.messages.append(el("div", { class: "msg user" }, el("div", { class: "bubble", text })));
      this.scrollToEnd(true);
    }

    async send(text, settings) {
      const model = this.model;
      if (!model) {
        this.addUser(text);
        this.messages.append(el("div", { class: "msg assistant" }, errorBox(new ApiError(null, "", { message: "no model to talk to: the model list did not load" }))));
        return;
      }
      const user = { role: "user", content: text };
      this.addUser(text);
      const messages = [...(settings.system ? [{ role: "system", content: settings.system }] : []), ...this.history, user];
      const body = el("div", { class: "text streaming" });
      const meta = el("div", { class: "meta mono", "data-status": "streaming" });
      const head = el("div", { class: "msg-head" },
        el("span", { class: "msg-model", text: model }),
        model in VARIANTS ? el("span", { class: "badge", text: "fused" }) : el("span", { class: "badge single", text: "single" }));
      const msg = el("div", { class: "msg assistant", "data-model": model }, head, el("div", { class: "bubble" }, body), meta);
      this.messages.append(msg);
      this.scrollToEnd(true);

      const controller = new AbortController();
      this.controller = controller;
      const t0 = performance.now();
      let answer = "";
      let segments = 0;
      let finish = null;
      let usage = null;
      const showMeta = (status) => {
        const secs = ((performance.now() - t0) / 1000).toFixed(1);
        const tokens = usage ? `${usage.completion_tokens} tokens · ` : "";
        const label = { streaming: "streaming…", stop: "done", length: "max_tokens reached", stopped: "stopped", error: "failed" }[status] || status;
        meta.dataset.status = status;
        meta.textContent = `${segments} segment${segments === 1 ? "" : "s"} · ${tokens}${secs} s · ${label}`;
      };
      showMeta("streaming");
      try {
        await streamChat({
          model, messages, stream: true, stream_options: { include_usage: true }, fusion: { trace: true },
          temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens,
        }, controller.signal, (chunk) => {
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) return showMeta("streaming");
          const delta = (choice.delta && choice.delta.content) || "";
          const step = chunk.fusion_step;
          if (step && step.text) {
            segments += 1;
            body.append(this.segment(step, segments, model));
            answer += step.text;
          } else if (delta) {
            body.append(el("span", { class: "plain", text: delta }));
            answer += delta;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
          showMeta("streaming");
          this.scrollToEnd(false);
        });
        showMeta(finish || "stop");
      } catch (e) {
        if (e && e.name === "AbortError") {
          showMeta("stopped");
        } else {
          showMeta("error");
          msg.append(errorBox(e));
          if (e instanceof ApiError && e.status === 401) openKeyDialog(e);
        }
      } finally {
        body.classList.remove("streaming");
        if (!answer) body.append(el("span", { class: "muted", text: "(no text)" }));
        if (this.controller === controller) this.controller = null;
        this.scrollToEnd(false);
      }
      if (answer) this.history.push(user, { role: "assistant", content: answer });
    }

    segment(step, index, model) {
      const cands = step.candidates || [];
      const win = cands.find((c) => (c.proposed_by || []).includes(step.winner));
      const by = win && win.proposed_by.length ? win.proposed_by : [step.winner];
      const agreed = by.length > 1;
      const span = el("span", { class: agreed ? "seg agreed" : "seg", text: step.text, "data-by": by.join(" ") });
      if (!step.text.trim()) span.classList.add(step.text.includes("\n") ? "blank-nl" : "blank");
      if (agreed) span.style.setProperty("--seg-bg", mixedBackground(by));
      else span.style.setProperty("--c", colorOf(by[0]));
      segInfo.set(span, { step, index, model, by });
      this.count(step, by, agreed && cands.length <= 1);
      return span;
    }
  }

  // ---- the candidates popover ----------------------------------------------------------------

  const pop = { span: null, pinned: false, hideTimer: 0 };

  function chip(name, extra) {
    return el("span", { class: "chip", style: { "--c": colorOf(name) } }, el("i", { class: "dot", style: { "--c": colorOf(name) } }), name, extra || null);
  }

  // the selection rule of a traced step (docs/selection.md); older servers: the paper's mean
  function ruleName(step) {
    return (step.selection && step.selection.rule) || "mean_ppl";
  }

  function scoreOf(c) {
    return c.score != null ? c.score : c.mean_ppl;
  }

  function renderPopover(info) {
    const { step, index, by } = info;
    const cands = step.candidates || [];
    const head = el("div", { class: "pop-head" },
      el("span", { class: "pop-title", text: `segment ${index}` }),
      by.length > 1 && cands.length <= 1
        ? el("span", { class: "muted", text: "agreed by " })
        : el("span", { class: "muted", text: "won by " }),
      ...by.map((n) => chip(n)),
      step.eos ? el("span", { class: "badge", text: "end of answer" }) : null);
    const parts = [head];
    if (!cands.length) {
      parts.push(el("p", { class: "muted", text: "No candidates were traced for this segment." }));
      return parts;
    }
    const models = [];
    for (const c of cands) for (const m of Object.keys(c.ppl || {})) if (!models.includes(m)) models.push(m);
    models.sort((a, b) => colorIndex(a) - colorIndex(b));
    const scored = models.length > 0;
    const thead = el("tr", {}, el("th", { text: "" }), el("th", { text: "candidate" }), el("th", { text: "proposed by" }),
      ...models.map((m) => el("th", { class: "num", title: `perplexity of the candidate under ${m}` },
        el("i", { class: "dot", style: { "--c": colorOf(m) } }), `ppl ${m}`)),
      scored ? el("th", { class: "num", text: ruleName(step) === "mean_ppl" ? "mean" : `score (${ruleName(step)})`,
        title: "the selection rule's combination of the perplexities: the lowest wins" }) : null);
    const winner = cands.find((x) => (x.proposed_by || []).includes(step.winner));
    const rows = cands.map((c) => {
      const isWin = c === winner;
      const ends = endsAnswer(c, winner, step, cands);
      return el("tr", { class: isWin ? "win" : "" },
        el("td", { class: "mark", text: isWin ? "★" : "" }),
        el("td", { class: "ctext mono" }, visibleText(c.text),
          ends ? el("span", { class: "badge eos", text: "ends", title: "this proposal also ends the answer" }) : null),
        el("td", { class: "by" }, ...(c.proposed_by || []).map((n) => chip(n))),
        ...models.map((m) => el("td", { class: "num mono", text: m in (c.ppl || {}) ? fmtPpl(c.ppl[m]) : "—" })),
        scored ? el("td", { class: "num mono mean", text: scoreOf(c) == null && !Object.keys(c.ppl || {}).length ? "—" : fmtPpl(scoreOf(c)) }) : null);
    });
    parts.push(el("div", { class: "pop-table" }, el("table", { class: "cands" }, el("thead", {}, thead), el("tbody", {}, ...rows))));
    if (!scored) {
      parts.push(el("p", { class: "pop-note", text: cands[0].proposed_by.length > 1
        ? "Every model proposed this same text, so no scoring was needed (mean ppl: —)."
        : "A single model: nothing to compare (mean ppl: —)." }));
    } else {
      parts.push(el("p", { class: "pop-note", text: ruleName(step) === "mean_ppl"
        ? "Perplexity of each candidate under each model; lowest mean wins (★)."
        : `Perplexity of each candidate under each model; lowest score under ${ruleName(step)} wins (★).` }));
    }
    return parts;
  }

  /** Whether candidate `c` ends the answer. The trace's candidates may carry `eos`; if not,
   * it is known where two candidates share a text (they then differ only in ending). */
  function endsAnswer(c, winner, step, cands) {
    if (typeof c.eos === "boolean") return c.eos && c.text !== "";
    if (!winner || c.text === "") return false;
    const twin = cands.some((x) => x !== c && x.text === c.text);
    if (!twin) return c === winner && step.eos;
    if (c === winner) return step.eos;
    return winner.text === c.text ? !step.eos : false;
  }

  function placePopover(span) {
    const p = ui.popover;
    const rects = [...span.getClientRects()];
    const r = rects.length ? rects[0] : span.getBoundingClientRect();
    const pw = p.offsetWidth;
    const ph = p.offsetHeight;
    const vw = document.documentElement.clientWidth;
    const vh = document.documentElement.clientHeight;
    let left = Math.min(Math.max(8, r.left), vw - pw - 8);
    const last = rects.length ? rects[rects.length - 1] : r;
    let top = last.bottom + 8;
    if (top + ph > vh - 8 && r.top - ph - 8 > 8) top = r.top - ph - 8;
    top = Math.max(8, Math.min(top, vh - ph - 8));
    p.style.left = `${Math.max(8, left)}px`;
    p.style.top = `${top}px`;
  }

  function showPopover(span, pinned) {
    const info = segInfo.get(span);
    if (!info) return;
    clearTimeout(pop.hideTimer);
    if (pop.span && pop.span !== span) pop.span.classList.remove("active");
    pop.span = span;
    pop.pinned = pinned;
    span.classList.add("active");
    ui.popover.replaceChildren(...renderPopover(info));
    ui.popover.classList.toggle("pinned", pinned);
    ui.popover.hidden = false;
    placePopover(span);
  }

  function hidePopover() {
    clearTimeout(pop.hideTimer);
    if (pop.span) pop.span.classList.remove("active");
    pop.span = null;
    pop.pinned = false;
    ui.popover.hidden = true;
  }

  function scheduleHide() {
    if (pop.pinned) return;
    clearTimeout(pop.hideTimer);
    pop.hideTimer = setTimeout(hidePopover, 180);
  }

  document.addEventListener("mouseover", (ev) => {
    const span = ev.target.closest && ev.target.closest(".seg");
    if (span) {
      if (!pop.pinned || pop.span === span) showPopover(span, pop.pinned && pop.span === span);
    } else if (ev.target.closest && ev.target.closest("#popover")) {
      clearTimeout(pop.hideTimer);
    }
  });
  document.addEventListener("mouseout", (ev) => {
    const from = ev.target.closest && (ev.target.closest(".seg") || ev.target.closest("#popover"));
    const to = ev.relatedTarget && ev.relatedTarget.closest && (ev.relatedTarget.closest(".seg") || ev.relatedTarget.closest("#popover"));
    if (from && !to) scheduleHide();
  });
  document.addEventListener("click", (ev) => {
    const span = ev.target.closest(".seg");
    if (span) {
      if (pop.pinned && pop.span === span) hidePopover();
      else showPopover(span, true);
      return;
    }
    if (!ev.target.closest("#popover")) hidePopover();
  });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !ui.popover.hidden) hidePopover(); });
  window.addEventListener("resize", () => { if (pop.span) placePopover(pop.span); });
  document.addEventListener("scroll", () => {
    if (!pop.span) return;
    if (pop.pinned) placePopover(pop.span); else hidePopover();
  }, true);

  // ---- legend -------------------------------------------------------------------------------

  function renderLegend() {
    const items = [...app.colors.keys()].map((n) =>
      el("li", { "data-model": n }, el("i", { class: "swatch", style: { "--c": colorOf(n) } }),
        el("span", { class: "legend-name", text: n }),
        app.sources.includes(n) ? null : el("span", { class: "muted small", text: "variant" })));
    if (app.sources.length > 1) {
      items.push(el("li", { "data-model": "agreed" },
        el("i", { class: "swatch agreed", style: { "--seg-bg": mixedBackground(app.sources) } }),
        el("span", { class: "legend-name", text: "agreed" }),
        el("span", { class: "muted small", text: "all proposed the same" })));
    }
    if (!items.length) items.push(el("li", { class: "muted", text: "models appear once the list loads" }));
    ui.legend.replaceChildren(...items);
  }

  // ---- models, panes, sending ------------------------------------------------------------------

  let retryTimer = 0;
  async function loadModels() {
    clearTimeout(retryTimer);
    try {
      app.models = await fetchModels();
    } catch (e) {
      showBanner(e);
      if (e instanceof ApiError && e.status === 401) openKeyDialog(e);
      else if (e instanceof ApiError && e.status === 503) retryTimer = setTimeout(loadModels, 1000 * (e.retryAfter || 5));
      return false;
    }
    hideBanner();
    app.sources = app.models.filter((m) => !(m in VARIANTS));
    app.sources.forEach(colorIndex);
    renderLegend();
    refreshPaneModels();
    return true;
  }

  function defaultModel(slot) {
    if (slot === 0) return app.models.includes("cool-fusion") ? "cool-fusion" : app.models[0];
    return app.sources[0] || app.models[1] || app.models[0];
  }

  function refreshPaneModels() {
    app.panes.forEach((p) => p.setModels(app.models, defaultModel(p.slot)));
  }

  function layoutPanes() {
    const want = ui.sideBySide.checked ? 2 : 1;
    while (app.panes.length < want) {
      const pane = new Pane(app.panes.length);
      app.panes.push(pane);
      ui.panes.append(pane.root);
      if (app.models.length) pane.setModels(app.models, defaultModel(pane.slot));
    }
    while (app.panes.length > want) app.panes.pop().root.remove();
    ui.panes.classList.toggle("two", want === 2);
    store.set("sideBySide", ui.sideBySide.checked);
  }

  function settings() {
    const num = (v, d) => (Number.isFinite(Number(v)) && v !== "" ? Number(v) : d);
    return {
      system: ui.system.value.trim(),
      temperature: num(ui.temperature.value, 0.7),
      top_p: num(ui.topP.value, 1),
      max_tokens: Math.max(1, Math.round(num(ui.maxTokens.value, 200))),
    };
  }

  function setBusy(busy) {
    app.busy = busy;
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.sideBySide.disabled = busy;
    $("#new-chat").disabled = busy;
    app.panes.forEach((p) => { p.select.disabled = busy; });
    document.body.classList.toggle("busy", busy);
  }

  async function sendPrompt(text) {
    text = (text || "").trim();
    if (!text || app.busy) return;
    ui.prompt.value = "";
    autoGrow();
    setBusy(true);
    const s = settings();
    try {
      await Promise.all(app.panes.map((p) => p.send(text, s)));
    } finally {
      setBusy(false);
      ui.prompt.focus();
    }
  }

  function stopAll() {
    app.panes.forEach((p) => p.controller && p.controller.abort());
  }

  // ---- API key dialog ------------------------------------------------------------------------

  function updateKeyLabel() {
    ui.keyLabel.textContent = app.apiKey ? "API key set" : "API key";
    ui.keyButton.classList.toggle("has-key", Boolean(app.apiKey));
  }

  function openKeyDialog(err) {
    ui.keyInput.value = app.apiKey;
    if (err) {
      ui.keyError.replaceChildren(...errorBox(err).childNodes);
      ui.keyError.hidden = false;
    } else {
      ui.keyError.hidden = true;
    }
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
    ui.keyInput.select();
  }

  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    app.apiKey = ui.keyInput.value.trim();
    store.set("apiKey", app.apiKey);
    updateKeyLabel();
    ui.keyDialog.close();
    loadModels();
  });
  $("#key-cancel").addEventListener("click", () => ui.keyDialog.close());
  $("#key-clear").addEventListener("click", () => { ui.keyInput.value = ""; ui.keyInput.focus(); });
  ui.keyButton.addEventListener("click", () => openKeyDialog(null));

  // ---- settings, theme, composer -----------------------------------------------------------------

  function bindSetting(input, key, out, digits) {
    const saved = store.get(key, null);
    if (saved != null) input.value = saved;
    const sync = () => {
      if (out) out.textContent = Number(input.value).toFixed(digits);
      store.set(key, input.value);
    };
    input.addEventListener("input", sync);
    input.addEventListener("change", sync);
    sync();
  }
  bindSetting(ui.system, "system");
  bindSetting(ui.temperature, "temperature", $("#temperature-out"), 2);
  bindSetting(ui.topP, "topP", $("#top-p-out"), 2);
  bindSetting(ui.maxTokens, "maxTokens");

  const THEMES = ["auto", "light", "dark"];
  function applyTheme(theme) {
    if (theme === "auto") delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = theme;
    const b = $("#theme-button");
    b.title = `Theme: ${theme}`;
    b.textContent = { auto: "◐", light: "☀", dark: "☾" }[theme];
    store.set("theme", theme);
  }
  $("#theme-button").addEventListener("click", () => {
    const cur = store.get("theme", "auto");
    applyTheme(THEMES[(THEMES.indexOf(cur) + 1) % THEMES.length]);
  });

  $("#toggle-sidebar").addEventListener("click", () => {
    const narrow = window.matchMedia("(max-width: 860px)").matches;
    document.body.classList.toggle(narrow ? "show-sidebar" : "hide-sidebar");
  });

  function autoGrow() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
  }
  ui.prompt.addEventListener("input", autoGrow);
  ui.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendPrompt(ui.prompt.value);
    }
  });
  ui.composer.addEventListener("submit", (ev) => { ev.preventDefault(); sendPrompt(ui.prompt.value); });
  ui.stop.addEventListener("click", stopAll);
  $("#new-chat").addEventListener("click", () => { hidePopover(); app.panes.forEach((p) => p.reset()); ui.prompt.focus(); });
  ui.sideBySide.addEventListener("change", layoutPanes);

  // ---- start ----------------------------------------------------------------------------------

  applyTheme(store.get("theme", "auto"));
  ui.sideBySide.checked = Boolean(store.get("sideBySide", false));
  updateKeyLabel();
  renderLegend();
  layoutPanes();
  loadModels();
  ui.prompt.focus();
})();
