// What FLENwheel nodes report after a run, on the node itself: the identity filter's summary, what the review
// queue stored, what a loader or writer did (their `text` UI output, which ComfyUI's own front-end shows only
// for a few core nodes). A review gate that waits for the reviewer says so, with the way to the gallery.
import { app } from "../../../scripts/app.js";

const GATE = "FLENReviewGate";
const POLL_MS = 1500;

function summaryOf(type, output) {
  const text = output && Array.isArray(output.text) ? output.text[0] : null;
  if (typeof text !== "string" || !text) return null;
  if (type === "FLENIdentityFilter") {
    try { return JSON.parse(text).summary || text; } catch { return text; }
  }
  return text.length > 800 ? `${text.slice(0, 800)}…` : text;
}

function summaryWidget(node) {
  if (node.flenSummary) return node.flenSummary;
  const el = document.createElement("div");
  el.className = "flen-node-summary";
  el.dataset.nodeId = String(node.id);
  el.dataset.nodeType = node.type;
  Object.assign(el.style, { font: "12px/1.35 system-ui, sans-serif", color: "#ddd", background: "rgba(0,0,0,.35)",
    borderRadius: "4px", padding: "4px 6px", overflow: "auto", whiteSpace: "pre-wrap", boxSizing: "border-box" });
  const text = document.createElement("div");
  text.className = "flen-node-summary-text";
  const actions = document.createElement("div");
  actions.className = "flen-node-summary-actions";
  Object.assign(actions.style, { display: "flex", gap: "6px", marginTop: "4px", flexWrap: "wrap" });
  el.append(text, actions);
  const widget = node.addDOMWidget("flen_summary", "flen_summary", el, {
    serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {},
  });
  widget.serialize = false; // never part of the saved workflow or of the prompt
  widget.computeLayoutSize = () => ({ minHeight: actions.childElementCount ? 112 : 48, maxHeight: 200, minWidth: 0 });
  node.flenSummary = { widget, el, text, actions };
  return node.flenSummary;
}

function button(label, cls, onclick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.className = cls;
  Object.assign(b.style, { font: "inherit", background: "#2a4a6a", color: "#fff", border: "1px solid #468",
    borderRadius: "4px", padding: "2px 8px", cursor: "pointer" });
  b.addEventListener("pointerdown", (ev) => ev.stopPropagation()); // a click on the button, not a node drag
  b.addEventListener("click", (ev) => { ev.stopPropagation(); onclick(); });
  return b;
}

function show(node, text, state, actions = []) {
  const s = summaryWidget(node);
  s.text.textContent = text;
  s.el.dataset.state = state;
  s.actions.replaceChildren(...actions);
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), min[1]]);
  node.setDirtyCanvas(true, true);
}

function galleryUrl(w) {
  const q = new URLSearchParams({ character: w.character, run: w.run_id, status: "pending" });
  return `/flenwheel/review/page?${q}`;
}

async function pollGates() {
  const nodes = (app.graph && (app.graph.nodes || app.graph._nodes)) || [];
  const gates = nodes.filter((n) => n.type === GATE);
  if (!gates.length) return;
  let waiting = [];
  try {
    waiting = (await (await fetch("/flenwheel/review/waiting")).json()).waiting || [];
  } catch { return; }
  for (const node of gates) {
    // a gate is keyed "<prompt id>:<node id>" (review_gate.py)
    const w = waiting.find((g) => g.key.split(":").pop() === String(node.id));
    if (w) {
      node.flenWaitingKey = w.key;
      show(node, `waiting for your review: ${w.pending} items (of ${w.count}, run ${w.run_id})`, "waiting", [
        button("open the gallery on them", "flen-open-gallery", () => window.open(galleryUrl(w), "_blank")),
        button("continue with what is approved", "flen-release-gate", () => fetch("/flenwheel/review/release", {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: w.key }) })),
      ]);
    } else if (node.flenWaitingKey) {
      node.flenWaitingKey = null;
      show(node, "review finished", "done");
    }
  }
}

app.registerExtension({
  name: "FLENwheel.nodeSummaries",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.name || "").startsWith("FLEN")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = summaryOf(nodeData.name, output);
      if (text) {
        this.flenWaitingKey = null;
        show(this, text, "done");
      }
    };
  },
  async setup() {
    setInterval(pollGates, POLL_MS);
  },
});
