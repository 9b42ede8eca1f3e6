// FLENwheel front-end entry. Marks itself loaded so tests (and users, in the console) can tell
// the pack's web folder was served and executed.
import { app } from "../../../scripts/app.js";

// /extensions/<the pack's folder>/js/flenwheel.js: the module name ComfyUI lists the pack's templates under
const MODULE = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2] || "FLENwheel");

// ComfyUI's template browser (frontend 1.27) titles a custom pack's templates with their file names and has
// no field for a description; the shipped workflows carry both (extra.title / extra.description), and this
// puts them on the pack's cards whenever the browser renders them.
async function labelTemplateCards() {
  let cards = {};
  try {
    cards = (await (await fetch("/flenwheel/templates")).json()).templates || {};
  } catch (err) {
    console.warn("[FLENwheel] template titles unavailable", err);
    return;
  }
  const apply = () => {
    for (const [name, info] of Object.entries(cards)) {
      for (const card of document.querySelectorAll(`[data-testid="template-workflow-${CSS.escape(name)}"]`)) {
        const img = card.querySelector("img");
        if (img && img.src && !img.src.includes(`/workflow_templates/${MODULE}/`)) continue; // another pack's
        const title = card.querySelector("h3");
        const text = card.querySelector("p");
        if (title && title.textContent !== info.title) { title.textContent = info.title; title.title = info.title; }
        if (text && info.description && text.textContent !== info.description) {
          text.textContent = info.description;
          text.title = info.description;
        }
        card.dataset.flenTemplate = name;
      }
    }
  };
  new MutationObserver(apply).observe(document.body, { childList: true, subtree: true });
  apply();
}

app.registerExtension({
  name: "FLENwheel.core",
  async setup() {
    let status = null;
    try {
      const res = await fetch("/flenwheel/status");
      status = res.ok ? await res.json() : null;
    } catch (err) {
      console.warn("[FLENwheel] status route unreachable", err);
    }
    labelTemplateCards();
    // the version lives in pyproject.toml only; the server reports it (engines/pack_info.py)
    const version = status ? status.version : null;
    window.FLENwheel = { loaded: true, version, server: status };
    document.documentElement.dataset.flenwheel = "loaded";
    console.log(`[FLENwheel] front-end loaded, pack version ${version ?? "unknown"}`);
  },
});
