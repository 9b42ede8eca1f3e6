// FLENwheel review gallery: grid + focused view over the pack's /flenwheel/review routes.
// Keyboard first. Used by the ComfyUI sidebar tab (review_sidebar.js) and the full page
// /flenwheel/review/page. Talks JSON over ids only; images come by candidate id.

const API = "/flenwheel/review";
const PAGE_SIZE = 60;
// the rejection reasons and their labels come from the server (engines/review_store.py, /facets): no copy here
let REASONS = [];
let REASON_TEXT = [];
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
    // The gallery opens on the last run with every status (opening on "pending" showed an empty page
    // once a run was judged); runPicked says whether the reviewer chose a run, else the newest is taken.
    filters: { run: "", status: opts.status ?? "", label: "", score_min: "", score_max: "", sort: "id" },
    runPicked: opts.run !== undefined, offset: 0, total: 0, items: [], cursor: 0, selected: new Set(),
    counts: null, undoStack: [], awaitingReason: false, lastRoundTripMs: null,
    pending: 0, view: "candidate", zoom: false, correcting: null, fixedFile: null,
    // captions typed but not yet sent (by candidate id): they go with that item's next approve or correction
    captionDrafts: new Map(),
  };
  if (opts.run) state.filters.run = opts.run;
  const g = {};
  root.classList.add("flen-review");
  if (opts.fullPage) root.classList.add("flen-review-full");
  root.tabIndex = 0;
  root.replaceChildren(
    h("div", { class: "flen-rv-bar" },
      g.character = h("select", { class: "flen-rv-character", title: "Character workspace",
        onchange: () => { state.character = g.character.value; localStorage.setItem("flen.review.character", state.character); reload(true); } }),
      g.run = h("select", { class: "flen-rv-run", title: "Run",
        onchange: () => { state.runPicked = true; setFilter("run", g.run.value); } }),
      g.status = h("select", { class: "flen-rv-status", title: "Status", onchange: () => setFilter("status", g.status.value) },
        ...["", "pending", "approved", "rejected", "corrected"].map((s) => h("option", { value: s }, s || "all statuses"))),
      g.label = h("select", { class: "flen-rv-label", title: "Angle/expression label", onchange: () => setFilter("label", g.label.value) }),
      g.smin = h("input", { class: "flen-rv-smin", type: "number", step: "0.05", placeholder: "score ≥", title: "Minimum identity score",
        onchange: () => setFilter("score_min", g.smin.value) }),
      g.smax = h("input", { class: "flen-rv-smax", type: "number", step: "0.05", placeholder: "score ≤", title: "Maximum identity score",
        onchange: () => setFilter("score_max", g.smax.value) }),
      g.sort = h("select", { class: "flen-rv-sort", title: "Order", onchange: () => setFilter("sort", g.sort.value) },
        ...[["id", "oldest first"], ["newest", "newest first"], ["score_desc", "score: best first"],
          ["score_asc", "score: worst first"]].map(([v, t]) => h("option", { value: v }, t))),
      h("button", { class: "flen-rv-refresh", title: "Reload", onclick: () => reload(true) }, "⟳"),
      !opts.fullPage && h("a", { class: "flen-rv-open", href: `${API}/page`, target: "_blank", title: "Open the full-page gallery" }, "⤢"),
    ),
    g.counts = h("div", { class: "flen-rv-counts" }),
    g.waiting = h("div", { class: "flen-rv-waiting", hidden: true }),
    h("div", { class: "flen-rv-keys" },
      "A approve · R reject (then 1–6) · 1–6 reject with reason · C correct · U / Ctrl+Z undo · J/K or ←/→ next/prev · X select · Shift+A/Shift+R all on page · B A/B source · Z zoom · Esc clear · caption: click to edit, it goes with A or C (Ctrl+Enter approves, Esc leaves it)"),
    g.reasonHint = h("div", { class: "flen-rv-reasons", hidden: true }, "Reason: "),
    h("div", { class: "flen-rv-main" },
      h("div", { class: "flen-rv-left" },
        g.grid = h("div", { class: "flen-rv-grid" }),
        h("div", { class: "flen-rv-pager" },
          h("button", { class: "flen-rv-prev", onclick: () => page(-1) }, "‹ prev"),
          g.pageInfo = h("span", { class: "flen-rv-pageinfo" }),
          h("button", { class: "flen-rv-next", onclick: () => page(1) }, "next ›"),
          h("button", { class: "flen-rv-bulk-approve", title: "Approve selected (Shift+A: whole page)", onclick: () => decideSelection("approve") }, "approve selected"),
          h("button", { class: "flen-rv-bulk-reject", title: "Reject selected with the reason beside (Shift+R: whole page)",
            onclick: () => decideSelection("reject", [g.bulkReason.value]) }, "reject selected"),
          g.bulkReason = h("select", { class: "flen-rv-bulk-reason", title: "Reason for bulk reject" }),
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

  function renderReasons(keys, labels) {
    REASONS = keys;
    REASON_TEXT = labels;
    g.reasonHint.replaceChildren("Reason: ",
      ...REASONS.map((r, i) => h("span", { class: "flen-rv-reason", dataset: { reason: r } }, `${i + 1} ${REASON_TEXT[i]}`)));
    g.bulkReason.replaceChildren(
      ...REASONS.map((r, i) => h("option", { value: r, selected: r === "other" }, REASON_TEXT[i])));
  }

  async function loadFacets() {
    if (!state.character) return;
    const f = await api(`/${state.character}/facets`);
    if (f.reasons.join() !== REASONS.join()) renderReasons(f.reasons, f.reason_labels);
    if (!state.runPicked) state.filters.run = f.runs.length ? f.runs[f.runs.length - 1].run_id : "";
    g.run.replaceChildren(h("option", { value: "" }, "all runs"),
      ...f.runs.map((r) => h("option", { value: r.run_id, selected: r.run_id === state.filters.run }, `${r.run_id} (${r.pending}/${r.n})`)));
    g.label.replaceChildren(h("option", { value: "" }, "all labels"),
      ...f.labels.map((l) => h("option", { value: l, selected: l === state.filters.label }, l)));
    g.status.value = state.filters.status;
    g.sort.value = state.filters.sort;
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
    const total = c.total ?? 0;
    const judged = total - (c.pending ?? 0);
    g.counts.replaceChildren(
      h("span", { class: "flen-rv-progress", title: state.filters.run ? `run ${state.filters.run}` : "all runs" },
        h("span", { class: "flen-rv-progress-text" }, `judged ${judged} of ${total}`),
        h("span", { class: "flen-rv-progress-bar" }, h("span", { style: `width:${total ? (100 * judged / total).toFixed(1) : 0}%` }))),
      ...["pending", "approved", "rejected", "corrected"].map((s) =>
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
          h("button", { class: "flen-rv-show-gate", onclick: () => showRun(w.character, w.run_id) }, "show"),
          h("button", { class: "flen-rv-release", onclick: () => releaseGate(w.key) }, "continue"))));
    } catch { g.waiting.hidden = true; }
  }

  async function showRun(character, run) {
    state.character = character;
    state.filters.run = run;
    state.runPicked = true;
    await reload(true);
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
      await loadFacets(); // first: it picks the run the counts and items are for
      await Promise.all([loadCounts(), loadItems(), loadWaiting()]);
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
  const refUrl = (id, n) => `${API}/${state.character}/ref/${id}/${n}`;
  const fixedUrl = (id, at) => `${API}/${state.character}/fixed/${id}?at=${at || 0}`;

  function correctionText(c) {
    if (!c) return "";
    const parts = [];
    if (c.instruction) parts.push(`“${c.instruction}”`);
    if (c.better_id !== null && c.better_id !== undefined) parts.push(`better: #${c.better_id}`);
    if (c.has_fixed_image) parts.push("fixed image");
    if (c.reasons && c.reasons.length) parts.push(c.reasons.map((r) => REASON_TEXT[REASONS.indexOf(r)] || r).join(", "));
    return parts.join(" · ");
  }

  function card(item, idx) {
    const corr = item.correction;
    return h("div", {
      class: `flen-rv-card status-${item.status}` + (idx === state.cursor ? " focused" : "") + (state.selected.has(item.id) ? " selected" : ""),
      dataset: { id: item.id, status: item.status, idx },
      onclick: (ev) => {
        if (ev.shiftKey || ev.ctrlKey || ev.metaKey) toggleSelect(item.id);
        state.cursor = idx; render(); root.focus();
      },
    },
      h("img", { src: thumbUrl(item.id), loading: "lazy", alt: `candidate ${item.id}`, draggable: "false" }),
      corr && h("div", { class: "flen-rv-card-correction", title: correctionText(corr) },
        "✎ ", corr.instruction || (corr.has_fixed_image ? "fixed image" : `better #${corr.better_id}`)),
      h("div", { class: "flen-rv-meta" },
        h("span", { class: "flen-rv-score", title: "identity score" }, fmtScore(item.score)),
        item.label && h("span", { class: "flen-rv-label-tag" }, item.label),
        h("span", { class: "flen-rv-status-tag" }, item.status),
        item.caption_edited && h("span", { class: "flen-rv-caption-tag", title: `caption edited: ${item.caption}` }, "✎ caption")),
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
    if (old && state.items[idx]) old.replaceWith(card(state.items[idx], idx));
  }

  function moveCursor(to) {
    const prev = state.cursor;
    state.cursor = to;
    state.view = "candidate";
    if (state.correcting !== null) closeCorrection();
    renderCard(prev);
    renderCard(to);
    const el = g.grid.children[to];
    if (el && el.scrollIntoView) el.scrollIntoView({ block: "nearest" });
    renderFocus();
  }

  // What the A/B key (B) cycles through: the candidate, its own source photo(s), the identity references.
  function views(item) {
    const out = [{ key: "candidate", url: imageUrl(item.id), caption: `candidate #${item.id}` }];
    for (let n = 0; n < (item.n_sources || 0); n++) out.push({ key: `source${n}`, url: sourceUrl(item.id, n), caption: "its source photo" });
    for (let n = 0; n < (item.n_refs || 0); n++) out.push({ key: `ref${n}`, url: refUrl(item.id, n), caption: `identity reference ${n + 1} of ${item.n_refs}` });
    return out;
  }

  function detailRows(item) {
    const m = item.meta || {};
    const idn = m.identity || {};
    const rows = [];
    const add = (k, v) => { if (v !== undefined && v !== null && v !== "") rows.push(h("tr", {}, h("th", {}, k), h("td", {}, String(v)))); };
    add("prompt", item.prompt);
    add("seed", item.seed);
    add("model", item.model);
    if (item.loras && item.loras.length) add("LoRAs", item.loras.map((l) => (typeof l === "object" ? `${l.name ?? l.lora ?? "?"} @ ${l.weight ?? l.strength ?? ""}` : String(l))).join(", "));
    add("label", item.label);
    add("identity score", item.score === null ? null : fmtScore(item.score));
    if (idn.score_mean !== undefined && idn.score_mean !== null) add("to the mean / best", `${fmtScore(idn.score_mean)} / ${fmtScore(idn.score_best)} (reference ${idn.best_reference ?? "?"})`);
    if (Array.isArray(idn.reference_scores)) add("per reference", idn.reference_scores.map((s, i) => `${i + 1}: ${fmtScore(s)}`).join(" · "));
    add("filter", idn.reason || m.reason);
    add("run", item.run_id);
    add("version", item.version);
    return h("table", { class: "flen-rv-details" }, ...rows);
  }

  function renderFocus() {
    const item = state.items[state.cursor];
    // a re-render while the reviewer types in the caption keeps the cursor where it was
    const ta = g.captionText;
    const keepFocus = ta && item && document.activeElement === ta && Number(ta.dataset.id) === item.id
      ? [ta.selectionStart, ta.selectionEnd] : null;
    if (!item) {
      g.focus.replaceChildren(h("div", { class: "flen-rv-empty" },
        state.character ? "Nothing here with these filters." : "No candidates yet: queue some with FLEN Review Queue."));
      return;
    }
    const all = views(item);
    const shown = all.find((v) => v.key === state.view) || all[0];
    const big = h("img", { class: "flen-rv-view " + (shown.key === "candidate" ? "flen-rv-candidate" : "flen-rv-source"),
      src: shown.url, alt: shown.caption, dataset: { view: shown.key } });
    const stage = h("div", { class: "flen-rv-stage" + (state.zoom ? " zoomed" : ""), title: "Z: zoom · B: A/B",
      onmousemove: (ev) => {
        if (!state.zoom) return;
        const r = stage.getBoundingClientRect();
        stage.scrollLeft = ((ev.clientX - r.left) / r.width) * (stage.scrollWidth - r.width);
        stage.scrollTop = ((ev.clientY - r.top) / r.height) * (stage.scrollHeight - r.height);
      } }, big);
    const strip = h("div", { class: "flen-rv-strip" }, ...all.map((v) => h("img", {
      class: "flen-rv-strip-img" + (v.key === shown.key ? " on" : ""), src: v.url, alt: v.caption, title: v.caption,
      onclick: () => { state.view = v.key; renderFocus(); } })));
    const corr = item.correction;
    g.focus.replaceChildren(
      h("figure", { class: "flen-rv-figure" }, stage, h("figcaption", { class: "flen-rv-view-caption" }, shown.caption + (state.zoom ? " · zoomed" : ""))),
      all.length > 1 ? strip : null,
      h("div", { class: "flen-rv-info", dataset: { id: item.id, status: item.status } },
        h("div", {}, h("b", { class: `flen-rv-status-big status-${item.status}` }, item.status),
          ` · score ${fmtScore(item.score)}`, item.label ? ` · ${item.label}` : "", ` · #${item.id}`),
        corr && h("div", { class: "flen-rv-correction" },
          h("div", {}, h("b", {}, "Correction: "), correctionText(corr)),
          corr.has_fixed_image && h("img", { class: "flen-rv-fixed", src: fixedUrl(item.id, corr.at), alt: "fixed image" })),
        captionBox(item),
        detailRows(item),
      ),
      state.correcting === item.id ? (state.panelEl ||= correctionPanel(item)) : null,
    );
    if (keepFocus) {
      g.captionText.focus();
      g.captionText.setSelectionRange(keepFocus[0], keepFocus[1]);
    }
  }

  // ---- the caption: edited here, saved with the decision (approve or correct) ----

  const captionDraft = (item) => (state.captionDrafts.has(item.id) ? state.captionDrafts.get(item.id) : item.caption || "");

  // the caption to send with a decision on this item: only when the reviewer changed it
  function captionChange(item) {
    if (!state.captionDrafts.has(item.id)) return undefined;
    const text = state.captionDrafts.get(item.id).trim();
    return text === (item.caption || "").trim() ? undefined : text;
  }

  function captionBox(item) {
    const draft = captionDraft(item);
    const unsaved = captionChange(item) !== undefined;
    const status = h("span", { class: "flen-rv-caption-state" },
      unsaved ? "not saved yet: goes with A (approve) or C (correct)" : item.caption_edited ? "✎ edited by the reviewer" : (item.caption ? "from the captioner" : "none yet"));
    const ta = h("textarea", { class: "flen-rv-caption" + (unsaved ? " unsaved" : ""), rows: 3, maxlength: "1500",
      "aria-label": "Caption", placeholder: "Caption for the dataset (the instance token is added if missing)",
      dataset: { id: item.id },
      oninput: () => {
        state.captionDrafts.set(item.id, ta.value);
        const now = captionChange(item) !== undefined;
        ta.classList.toggle("unsaved", now);
        status.textContent = now ? "not saved yet: goes with A (approve) or C (correct)" : item.caption_edited ? "✎ edited by the reviewer" : (item.caption ? "from the captioner" : "none yet");
      },
      onkeydown: (ev) => {
        // typing here is text, not gallery shortcuts (the gallery's own handler skips textareas too)
        ev.stopPropagation();
        if (ev.key === "Escape") { ev.preventDefault(); root.focus(); }
        else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); root.focus(); decideFocused("approve"); }
      } });
    ta.value = draft;
    g.captionText = ta;
    return h("div", { class: "flen-rv-caption-box" + (item.caption_edited ? " edited" : "") },
      h("label", {}, h("b", {}, "Caption "), status, ta));
  }

  // ---- corrections: the editor flywheel's input ----

  function correctionPanel(item) {
    const corr = item.correction || {};
    const p = {};
    const setFile = (file) => {
      if (!file || !file.type.startsWith("image/")) { toast("That is not an image file", true); return; }
      state.fixedFile = file;
      p.preview.src = URL.createObjectURL(file);
      p.preview.hidden = false;
      p.dropText.textContent = `${file.name || "pasted image"} (${Math.round(file.size / 1024)} KB)`;
    };
    const panel = h("div", { class: "flen-rv-panel", role: "dialog", "aria-label": "Correct this edit",
      onkeydown: (ev) => {
        if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); closeCorrection(); renderFocus(); root.focus(); }
        else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); ev.stopPropagation(); saveCorrection(item, p); }
        ev.stopPropagation(); // typing here is text, not gallery shortcuts
      } },
      h("h3", {}, `Correct #${item.id}`),
      h("div", { class: "flen-rv-panel-cols" },
        h("label", {}, "Original instruction",
          h("textarea", { class: "flen-rv-original", readonly: true, rows: 4 }, item.prompt || "(none)")),
        h("label", {}, "Corrected instruction",
          p.instruction = h("textarea", { class: "flen-rv-instruction", rows: 4 }, corr.instruction || item.prompt || ""))),
      h("div", { class: "flen-rv-panel-reasons" }, "What was wrong: ",
        ...REASONS.map((r, i) => h("label", {}, p[`r_${r}`] = h("input", { type: "checkbox", value: r,
          class: "flen-rv-panel-reason", checked: (corr.reasons || []).includes(r) }), ` ${REASON_TEXT[i]}`))),
      h("label", { class: "flen-rv-panel-better" }, "Better candidate #",
        p.better = h("input", { type: "number", min: "1", class: "flen-rv-better", value: corr.better_id ?? "" })),
      p.drop = h("div", { class: "flen-rv-drop", tabindex: "0",
        ondragover: (ev) => { ev.preventDefault(); p.drop.classList.add("over"); },
        ondragleave: () => p.drop.classList.remove("over"),
        ondrop: (ev) => { ev.preventDefault(); p.drop.classList.remove("over"); setFile(ev.dataTransfer.files[0]); },
        onclick: () => p.file.click() },
        p.dropText = h("span", {}, "Fixed image: drop it here, paste it (Ctrl+V) or click to choose a file"),
        p.preview = h("img", { class: "flen-rv-drop-preview", hidden: true, alt: "fixed image" }),
        p.file = h("input", { type: "file", accept: "image/*", class: "flen-rv-file", hidden: true,
          onchange: () => setFile(p.file.files[0]) })),
      h("div", { class: "flen-rv-panel-buttons" },
        h("button", { class: "flen-rv-save-correction", onclick: () => saveCorrection(item, p) }, "save correction (Ctrl+Enter)"),
        h("button", { class: "flen-rv-cancel-correction", onclick: () => { closeCorrection(); renderFocus(); root.focus(); } }, "cancel (Esc)")),
    );
    p.paste = (ev) => {
      const file = [...(ev.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) { ev.preventDefault(); setFile(file); }
    };
    document.addEventListener("paste", p.paste);
    state.closePaste = () => document.removeEventListener("paste", p.paste);
    setTimeout(() => p.instruction.focus());
    return panel;
  }

  function openCorrection() {
    const item = state.items[state.cursor];
    if (!item) return;
    state.correcting = item.id;
    state.fixedFile = null;
    state.panelEl = null;
    root.dataset.correcting = String(item.id);
    renderFocus();
  }

  function closeCorrection() {
    state.correcting = null;
    state.panelEl = null;
    state.fixedFile = null;
    if (state.closePaste) state.closePaste();
    state.closePaste = null;
    root.dataset.correcting = "";
  }

  function saveCorrection(item, p) {
    const instruction = p.instruction.value.trim();
    const reasons = REASONS.filter((r) => p[`r_${r}`].checked);
    const better = p.better.value ? Number(p.better.value) : null;
    const file = state.fixedFile;
    const caption = captionChange(item);
    const changed = instruction && instruction !== (item.prompt || "").trim();
    if (!changed && better === null && !file) {
      toast("A correction needs a changed instruction, a better candidate or a fixed image", true);
      return;
    }
    closeCorrection();
    enqueue(async () => {
      let res = null;
      if (changed || better !== null || reasons.length || caption !== undefined || !file) {
        const body = { ids: [item.id], action: "correct", reasons };
        body.instruction = changed ? instruction : (better === null ? item.prompt || instruction : "");
        if (better !== null) body.better_id = better;
        if (caption !== undefined) body.caption = caption;
        res = await post(`/${state.character}/decide`, body);
        if (caption !== undefined) sentCaption(item.id, caption);
      }
      if (file) {
        res = await api(`/${state.character}/items/${item.id}/fixed`, { method: "POST",
          headers: { "Content-Type": file.type || "application/octet-stream" }, body: file });
        res.counts = (await api(`/${state.character}/counts?${state.filters.run ? new URLSearchParams({ run: state.filters.run }) : ""}`));
      }
      applyResult(res, "correct", [item.id]);
    }, [item.id]);
    renderFocus();
    root.focus();
  }

  // ---- decisions: one queue, in key-press order ----
  // Each key press takes its item at the moment of the press and goes into one queue, sent one after the other:
  // a fast reviewer never loses a press and a decision never lands on the item the cursor moved on to.

  let chain = Promise.resolve();

  function enqueue(work, ids) {
    state.pending += 1;
    root.dataset.pendingDecisions = String(state.pending);
    for (const id of ids || []) markSaving(id, true);
    const run = async () => {
      const t0 = performance.now();
      try {
        await work();
        state.lastRoundTripMs = performance.now() - t0;
        root.dataset.roundTripMs = state.lastRoundTripMs.toFixed(1);
      } catch (err) {
        toast(`not saved: ${err.message || err}`, true);
        for (const id of ids || []) markFailed(id);
      } finally {
        for (const id of ids || []) markSaving(id, false);
        state.pending -= 1;
        root.dataset.pendingDecisions = String(state.pending);
      }
    };
    chain = chain.then(run);
    return chain;
  }

  function cardOf(id) { return g.grid.querySelector(`.flen-rv-card[data-id="${id}"]`); }
  function markSaving(id, on) { const el = cardOf(id); if (el) el.classList.toggle("saving", on); }
  function markFailed(id) { const el = cardOf(id); if (el) el.classList.add("unsaved"); }

  async function post(path, body) {
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }

  function applyResult(res, action, ids) {
    if (!res) return;
    for (const it of res.items) {
      const idx = state.items.findIndex((x) => x.id === it.id);
      if (idx >= 0) { state.items[idx] = it; renderCard(idx); }
    }
    if (res.counts) { state.counts = res.counts; renderCounts(); }
    root.dataset.lastDecision = `${action}:${ids.join(",")}`;
    toast(`saved: ${action} ${ids.length > 1 ? ids.length + " items" : "#" + ids[0]}`);
    if (ids.includes(state.items[state.cursor]?.id)) renderFocus();
  }

  function decide(ids, action, extra = {}) {
    if (!ids.length) return Promise.resolve();
    if (action !== "undo") state.undoStack.push(ids);
    return enqueue(async () => {
      const res = await post(`/${state.character}/decide`, { ids, action, ...extra });
      if (extra.caption !== undefined) sentCaption(ids[0], extra.caption);
      if (state.filters.run) { // counts of the run shown, not of the whole store
        res.counts = await api(`/${state.character}/counts?${new URLSearchParams({ run: state.filters.run })}`);
      }
      applyResult(res, action, ids);
    }, ids);
  }

  // a draft is dropped once the server has stored it (unless the reviewer typed on meanwhile)
  function sentCaption(id, text) {
    if (state.captionDrafts.has(id) && state.captionDrafts.get(id).trim() === text) state.captionDrafts.delete(id);
  }

  function decideFocused(action, extra = {}) {
    const item = state.items[state.cursor];
    if (!item) return;
    const caption = action === "approve" ? captionChange(item) : undefined;
    decide([item.id], action, caption === undefined ? extra : { ...extra, caption });
    if (action !== "undo" && state.cursor < state.items.length - 1) moveCursor(state.cursor + 1);
  }

  function decideSelection(action, reasons) {
    const ids = [...state.selected];
    if (!ids.length) { toast("Select items first (X or Shift+click), or Shift+A / Shift+R for the whole page"); return; }
    decide(ids, action, reasons ? { reasons } : {});
    state.selected.clear();
    render();
  }

  function undo() {
    const ids = state.undoStack.pop() || (state.items[state.cursor] ? [state.items[state.cursor].id] : []);
    if (!ids.length) return;
    decide(ids, "undo");
    const idx = state.items.findIndex((x) => x.id === ids[0]);
    if (idx >= 0) moveCursor(idx);
  }

  function setReasonMode(on) {
    state.awaitingReason = on;
    g.reasonHint.hidden = !on;
    root.dataset.awaitingReason = on ? "1" : "";
  }

  function toggleView() {
    const item = state.items[state.cursor];
    if (!item) return;
    const all = views(item);
    const i = all.findIndex((v) => v.key === state.view);
    state.view = all[(i + 1) % all.length].key;
    renderFocus();
  }

  function onKey(ev) {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    const k = ev.key;
    if (state.correcting !== null) { // the correction panel has the keyboard
      if (k === "Escape") { closeCorrection(); renderFocus(); ev.preventDefault(); }
      return;
    }
    let handled = true;
    if (state.awaitingReason && /^[1-6]$/.test(k)) {
      setReasonMode(false);
      decideFocused("reject", { reasons: [REASONS[Number(k) - 1]] });
    } else if (k === "Escape") {
      setReasonMode(false); state.selected.clear(); state.zoom = false; render();
    } else if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) {
      undo();
    } else if (ev.ctrlKey || ev.metaKey || ev.altKey) {
      handled = false;
    } else if (k === "A" && ev.shiftKey) {
      state.items.forEach((x) => state.selected.add(x.id)); decideSelection("approve");
    } else if (k === "R" && ev.shiftKey) {
      state.items.forEach((x) => state.selected.add(x.id)); decideSelection("reject", [g.bulkReason.value]);
    } else if (k === "a" || k === "A") {
      if (state.selected.size) decideSelection("approve"); else decideFocused("approve");
    } else if (k === "r") {
      setReasonMode(!state.awaitingReason);
    } else if (/^[1-6]$/.test(k)) {
      const reasons = [REASONS[Number(k) - 1]];
      if (state.selected.size) decideSelection("reject", reasons); else decideFocused("reject", { reasons });
    } else if (k === "u" || k === "U") {
      undo();
    } else if (k === "c" || k === "C") {
      openCorrection();
    } else if (k === "b" || k === "B") {
      toggleView();
    } else if (k === "z" || k === "Z") {
      state.zoom = !state.zoom; renderFocus();
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

  function toggleSelect(id) {
    if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
  }

  (opts.fullPage ? document : root).addEventListener("keydown", onKey);
  const timer = setInterval(() => { if (root.isConnected) loadWaiting(); }, 3000);
  const ready = reload(true).then(() => { root.dataset.ready = "1"; });
  root.flenGallery = { state, reload, ready, showRun, settled: () => chain, destroy: () => clearInterval(timer) };
  return root.flenGallery;
}
