// FLENwheel review gallery: grid + focused view over the pack's /flenwheel/review routes.
// Keyboard first. Used by the ComfyUI sidebar tab (review_sidebar.js) and the full page
// /flenwheel/review/page. Talks JSON over ids only; images come by candidate id.

const API = "/flenwheel/review";
const PAGE_SIZE = 60;
const REASONS = ["identity_drift", "artefacts", "wrong_angle", "wrong_expression", "pixel_shift", "other"];
const REASON_TEXT = ["identity drift", "artefacts", "wrong angle", "wrong expression", "pixel shift/zoom", "other"];
const CSS_URL = "/extensions/FLENwheel/css/review_gallery.css";

function ensureCss() {
  if (document.querySelector(`link[href="${CSS_URL}"]`)) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = CSS_URL;
  document.head.appendChild(link);
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, options = {}) {
  const res = await fetch(API + path, options);
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

const fmtScore = (s) => (s === null || s === undefined ? "–" : Number(s).toFixed(2));

export function mountGallery(root, opts = {}) {
  ensureCss();
  const state = {
    character: opts.character || localStorage.getItem("flen.review.character") || "",
    filters: { run: "", status: "pending", label: "", score_min: "", score_max: "" },
    offset: 0, total: 0, items: [], cursor: 0, selected: new Set(),
    counts: null, undoStack: [], awaitingReason: false, busy: false, lastRoundTripMs: null,
  };
  const g = {};
  root.classList.add("flen-review");
  if (opts.fullPage) root.classList.add("flen-review-full");
  root.tabIndex = 0;
  root.replaceChildren(
    h("div", { class: "flen-rv-bar" },
      g.character = h("select", { class: "flen-rv-character", title: "Character workspace",
        onchange: () => { state.character = g.character.value; localStorage.setItem("flen.review.character", state.character); reload(true); } }),
      g.run = h("select", { class: "flen-rv-run", title: "Run", onchange: () => setFilter("run", g.run.value) }),
      g.status = h("select", { class: "flen-rv-status", title: "Status", onchange: () => setFilter("status", g.status.value) },
        ...["", "pending", "approved", "rejected", "corrected"].map((s) => h("option", { value: s }, s || "all statuses"))),
      g.label = h("select", { class: "flen-rv-label", title: "Angle/expression label", onchange: () => setFilter("label", g.label.value) }),
      g.smin = h("input", { class: "flen-rv-smin", type: "number", step: "0.05", placeholder: "score ≥", title: "Minimum identity score",
        onchange: () => setFilter("score_min", g.smin.value) }),
      g.smax = h("input", { class: "flen-rv-smax", type: "number", step: "0.05", placeholder: "score ≤", title: "Maximum identity score",
        onchange: () => setFilter("score_max", g.smax.value) }),
      h("button", { class: "flen-rv-refresh", title: "Reload", onclick: () => reload(true) }, "⟳"),
      !opts.fullPage && h("a", { class: "flen-rv-open", href: `${API}/page`, target: "_blank", title: "Open the full-page gallery" }, "⤢"),
    ),
    g.counts = h("div", { class: "flen-rv-counts" }),
    g.waiting = h("div", { class: "flen-rv-waiting", hidden: true }),
    h("div", { class: "flen-rv-keys" },
      "A approve · R reject (then 1–6) · 1–6 reject with reason · C correct · U / Ctrl+Z undo · J/K or ←/→ next/prev · X select · Shift+A/Shift+R all on page · Esc clear"),
    g.reasonHint = h("div", { class: "flen-rv-reasons", hidden: true },
      "Reason: ", ...REASONS.map((r, i) => h("span", { class: "flen-rv-reason", dataset: { reason: r } }, `${i + 1} ${REASON_TEXT[i]}`))),
    h("div", { class: "flen-rv-main" },
      h("div", { class: "flen-rv-left" },
        g.grid = h("div", { class: "flen-rv-grid" }),
        h("div", { class: "flen-rv-pager" },
          h("button", { class: "flen-rv-prev", onclick: () => page(-1) }, "‹ prev"),
          g.pageInfo = h("span", { class: "flen-rv-pageinfo" }),
          h("button", { class: "flen-rv-next", onclick: () => page(1) }, "next ›"),
          h("button", { class: "flen-rv-bulk-approve", title: "Approve selected (Shift+A: whole page)", onclick: () => decideSelection("approve") }, "approve selected"),
          h("button", { class: "flen-rv-bulk-reject", title: "Reject selected (Shift+R: whole page)", onclick: () => decideSelection("reject", ["other"]) }, "reject selected"),
        ),
      ),
      g.focus = h("div", { class: "flen-rv-focus" }),
    ),
    g.toast = h("div", { class: "flen-rv-toast", role: "status" }),
  );

  function toast(msg, bad = false) {
    g.toast.textContent = msg;
    g.toast.classList.toggle("bad", bad);
  }

  function setFilter(key, value) {
    state.filters[key] = value;
    reload(false);
  }

  function query() {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(state.filters)) if (v !== "" && v !== null) q.set(k, v);
    return q;
  }

  async function loadCharacters() {
    const { characters } = await api("/characters");
    const names = characters.map((c) => c.name);
    if (!names.includes(state.character)) state.character = names[0] || "";
    g.character.replaceChildren(...(names.length ? names : [""]).map((n) =>
      h("option", { value: n, selected: n === state.character }, n || "(no character yet)")));
  }

  async function loadFacets() {
    if (!state.character) return;
    const f = await api(`/${state.character}/facets`);
    g.run.replaceChildren(h("option", { value: "" }, "all runs"),
      ...f.runs.map((r) => h("option", { value: r.run_id, selected: r.run_id === state.filters.run }, `${r.run_id} (${r.pending}/${r.n})`)));
    g.label.replaceChildren(h("option", { value: "" }, "all labels"),
      ...f.labels.map((l) => h("option", { value: l, selected: l === state.filters.label }, l)));
    g.status.value = state.filters.status;
  }

  async function loadCounts() {
    if (!state.character) { g.counts.replaceChildren(); return; }
    const q = new URLSearchParams();
    if (state.filters.run) q.set("run", state.filters.run);
    state.counts = await api(`/${state.character}/counts?${q}`);
    renderCounts();
  }

  function renderCounts() {
    const c = state.counts || {};
    g.counts.replaceChildren(...["pending", "approved", "rejected", "corrected"].map((s) =>
      h("span", { class: `flen-rv-count flen-rv-count-${s}`, dataset: { status: s } }, `${s} `, h("b", {}, String(c[s] ?? 0)))));
  }

  async function loadItems() {
    if (!state.character) { state.items = []; state.total = 0; render(); return; }
    const q = query();
    q.set("offset", state.offset);
    q.set("limit", PAGE_SIZE);
    const seq = (state.itemsSeq = (state.itemsSeq || 0) + 1);
    const p = await api(`/${state.character}/items?${q}`);
    if (seq !== state.itemsSeq) return; // a newer filter change is on its way: drop this stale answer
    state.items = p.items;
    state.total = p.total;
    state.cursor = Math.min(state.cursor, Math.max(0, state.items.length - 1));
    render();
  }

  async function loadWaiting() {
    try {
      const { waiting } = await api("/waiting");
      const mine = waiting || [];
      g.waiting.hidden = mine.length === 0;
      g.waiting.replaceChildren(...mine.map((w) =>
        h("span", { class: "flen-rv-gate", dataset: { gate: w.key } },
          `⏸ ${w.character} · run ${w.run_id}: ${w.pending} pending`,
          h("button", { class: "flen-rv-release", onclick: () => releaseGate(w.key) }, "continue"))));
    } catch { g.waiting.hidden = true; }
  }

  async function releaseGate(key) {
    await api("/release", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key }) });
    toast("Gate released");
    loadWaiting();
  }

  async function reload(all) {
    try {
      if (all) await loadCharacters();
      state.offset = 0;
      state.cursor = 0;
      await Promise.all([loadFacets(), loadCounts(), loadItems(), loadWaiting()]);
    } catch (err) { toast(String(err.message || err), true); }
  }

  function page(delta) {
    const next = state.offset + delta * PAGE_SIZE;
    if (next < 0 || next >= state.total) return;
    state.offset = next;
    state.cursor = delta > 0 ? 0 : PAGE_SIZE - 1;
    state.selected.clear();
    loadItems().catch((e) => toast(e.message, true));
  }

  const thumbUrl = (id) => `${API}/${state.character}/thumb/${id}`;
  const imageUrl = (id) => `${API}/${state.character}/image/${id}`;
  const sourceUrl = (id, n) => `${API}/${state.character}/source/${id}/${n}`;

  function card(item, idx) {
    return h("div", {
      class: `flen-rv-card status-${item.status}` + (idx === state.cursor ? " focused" : "") + (state.selected.has(item.id) ? " selected" : ""),
      dataset: { id: item.id, status: item.status, idx },
      onclick: (ev) => {
        if (ev.shiftKey || ev.ctrlKey || ev.metaKey) toggleSelect(item.id);
        state.cursor = idx; render(); root.focus();
      },
    },
      h("img", { src: thumbUrl(item.id), loading: "lazy", alt: `candidate ${item.id}`, draggable: "false" }),
      h("div", { class: "flen-rv-meta" },
        h("span", { class: "flen-rv-score", title: "identity score" }, fmtScore(item.score)),
        item.label && h("span", { class: "flen-rv-label-tag" }, item.label),
        h("span", { class: "flen-rv-status-tag" }, item.status)),
    );
  }

  function render() {
    g.grid.replaceChildren(...state.items.map(card));
    const from = state.total ? state.offset + 1 : 0;
    g.pageInfo.textContent = `${from}–${state.offset + state.items.length} of ${state.total}` +
      (state.selected.size ? ` · ${state.selected.size} selected` : "");
    renderFocus();
  }

  function renderCard(idx) {
    const old = g.grid.children[idx];
    if (old) old.replaceWith(card(state.items[idx], idx));
  }

  function moveCursor(to) {
    const prev = state.cursor;
    state.cursor = to;
    renderCard(prev);
    renderCard(to);
    const el = g.grid.children[to];
    if (el && el.scrollIntoView) el.scrollIntoView({ block: "nearest" });
    renderFocus();
  }

  function renderFocus() {
    const item = state.items[state.cursor];
    if (!item) {
      g.focus.replaceChildren(h("div", { class: "flen-rv-empty" },
        state.character ? "Nothing here with these filters." : "No candidates yet: queue some with FLEN Review Queue."));
      return;
    }
    const sources = Array.from({ length: item.n_sources }, (_, n) =>
      h("figure", {}, h("img", { class: "flen-rv-source", src: sourceUrl(item.id, n), alt: "source" }), h("figcaption", {}, "source")));
    g.focus.replaceChildren(
      h("div", { class: "flen-rv-pair" }, ...sources,
        h("figure", {}, h("img", { class: "flen-rv-candidate", src: imageUrl(item.id), alt: "candidate" }),
          h("figcaption", {}, `candidate #${item.id}`))),
      h("div", { class: "flen-rv-info", dataset: { id: item.id, status: item.status } },
        h("div", {}, h("b", { class: `flen-rv-status-big status-${item.status}` }, item.status),
          ` · score ${fmtScore(item.score)}`, item.label ? ` · ${item.label}` : "", ` · run ${item.run_id}`,
          item.version ? ` · ${item.version}` : "", item.seed !== null ? ` · seed ${item.seed}` : ""),
        item.prompt && h("div", { class: "flen-rv-prompt" }, item.prompt),
        item.model && h("div", { class: "flen-rv-model" }, `model ${item.model}`),
        item.loras && item.loras.length ? h("div", { class: "flen-rv-loras" },
          "LoRAs: " + item.loras.map((l) => (typeof l === "object" ? `${l.name ?? l.lora ?? "?"}@${l.weight ?? l.strength ?? ""}` : String(l))).join(", ")) : null,
      ),
    );
  }

  function toggleSelect(id) {
    if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
  }

  async function decide(ids, action, extra = {}) {
    if (!ids.length || state.busy) return;
    state.busy = true;
    const t0 = performance.now();
    try {
      const res = await api(`/${state.character}/decide`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ids, action, ...extra }),
      });
      state.lastRoundTripMs = performance.now() - t0;
      for (const it of res.items) {
        const idx = state.items.findIndex((x) => x.id === it.id);
        if (idx >= 0) { state.items[idx] = it; renderCard(idx); }
      }
      if (action !== "undo") state.undoStack.push(ids);
      state.counts = res.counts;
      renderCounts();
      root.dataset.lastDecision = `${action}:${ids.join(",")}`;
      root.dataset.roundTripMs = state.lastRoundTripMs.toFixed(1);
      toast(`saved: ${action} ${ids.length > 1 ? ids.length + " items" : "#" + ids[0]}`);
      return res;
    } catch (err) {
      toast(`not saved: ${err.message || err}`, true);
    } finally { state.busy = false; }
  }

  async function decideFocused(action, extra) {
    const item = state.items[state.cursor];
    if (!item) return;
    const res = await decide([item.id], action, extra);
    if (res && action !== "undo" && state.cursor < state.items.length - 1) moveCursor(state.cursor + 1);
    else renderFocus();
  }

  async function decideSelection(action, reasons) {
    const ids = [...state.selected];
    if (!ids.length) { toast("Select items first (X or Shift+click), or Shift+A / Shift+R for the whole page"); return; }
    await decide(ids, action, reasons ? { reasons } : {});
    state.selected.clear();
    render();
  }

  async function undo() {
    const ids = state.undoStack.pop() || (state.items[state.cursor] ? [state.items[state.cursor].id] : []);
    await decide(ids, "undo");
    const idx = state.items.findIndex((x) => x.id === ids[0]);
    if (idx >= 0) moveCursor(idx);
  }

  function setReasonMode(on) {
    state.awaitingReason = on;
    g.reasonHint.hidden = !on;
    root.dataset.awaitingReason = on ? "1" : "";
  }

  async function correct() {
    const item = state.items[state.cursor];
    if (!item) return;
    const instruction = window.prompt("Corrected instruction (or #id of a better candidate):", item.prompt || "");
    if (!instruction) return;
    const m = instruction.trim().match(/^#(\d+)$/);
    await decideFocused("correct", m ? { better_id: Number(m[1]) } : { instruction });
  }

  function onKey(ev) {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    const k = ev.key;
    let handled = true;
    if (state.awaitingReason && /^[1-6]$/.test(k)) {
      setReasonMode(false);
      decideFocused("reject", { reasons: [REASONS[Number(k) - 1]] });
    } else if (k === "Escape") {
      setReasonMode(false); state.selected.clear(); render();
    } else if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) {
      undo();
    } else if (ev.ctrlKey || ev.metaKey || ev.altKey) {
      handled = false;
    } else if (k === "A" && ev.shiftKey) {
      state.items.forEach((x) => state.selected.add(x.id)); decideSelection("approve");
    } else if (k === "R" && ev.shiftKey) {
      state.items.forEach((x) => state.selected.add(x.id)); decideSelection("reject", ["other"]);
    } else if (k === "a" || k === "A") {
      if (state.selected.size) decideSelection("approve"); else decideFocused("approve");
    } else if (k === "r") {
      setReasonMode(true);
    } else if (/^[1-6]$/.test(k)) {
      const reasons = [REASONS[Number(k) - 1]];
      if (state.selected.size) decideSelection("reject", reasons); else decideFocused("reject", { reasons });
    } else if (k === "u" || k === "U") {
      undo();
    } else if (k === "c" || k === "C") {
      correct();
    } else if (k === "x" || k === "X" || k === " ") {
      const item = state.items[state.cursor];
      if (item) { toggleSelect(item.id); render(); }
    } else if (k === "j" || k === "ArrowRight" || k === "ArrowDown") {
      if (state.cursor < state.items.length - 1) moveCursor(state.cursor + 1); else page(1);
    } else if (k === "k" || k === "ArrowLeft" || k === "ArrowUp") {
      if (state.cursor > 0) moveCursor(state.cursor - 1); else page(-1);
    } else {
      handled = false;
    }
    if (handled) { ev.preventDefault(); ev.stopPropagation(); }
  }

  (opts.fullPage ? document : root).addEventListener("keydown", onKey);
  const timer = setInterval(() => { if (root.isConnected) loadWaiting(); }, 3000);
  const ready = reload(true).then(() => { root.dataset.ready = "1"; });
  root.flenGallery = { state, reload, ready, destroy: () => clearInterval(timer) };
  return root.flenGallery;
}
