// FLENwheel review gallery as a ComfyUI sidebar tab (frontend ≥ 1.2x: extensionManager.registerSidebarTab).
import { app } from "../../../scripts/app.js";
import { mountGallery } from "./review_gallery.js";

app.registerExtension({
  name: "FLENwheel.review",
  async setup() {
    const manager = app.extensionManager;
    if (!manager || typeof manager.registerSidebarTab !== "function") {
      console.warn("[FLENwheel] this ComfyUI front-end has no sidebar tabs; use /flenwheel/review/page");
      return;
    }
    manager.registerSidebarTab({
      id: "flenwheel-review",
      icon: "pi pi-images",
      title: "FLEN review",
      tooltip: "FLENwheel review gallery (A approve, R reject, U undo)",
      type: "custom",
      render: (el) => {
        const holder = document.createElement("div");
        holder.className = "flen-review-sidebar";
        holder.style.height = "100%";
        el.replaceChildren(holder);
        mountGallery(holder, { fullPage: false });
        holder.focus();
      },
    });
    document.documentElement.dataset.flenReviewTab = "registered";
  },
});
