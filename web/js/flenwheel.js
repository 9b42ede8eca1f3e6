// FLENwheel front-end entry. Marks itself loaded so tests (and users, in the console) can tell
// the pack's web folder was served and executed.
import { app } from "../../../scripts/app.js";

const FLENWHEEL_VERSION = "0.1.0";

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
    window.FLENwheel = { loaded: true, version: FLENWHEEL_VERSION, server: status };
    document.documentElement.dataset.flenwheel = "loaded";
    console.log(`[FLENwheel] front-end ${FLENWHEEL_VERSION} loaded`);
  },
});
