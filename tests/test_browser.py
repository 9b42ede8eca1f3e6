"""The pack in the real ComfyUI front-end, in real Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]


def test_extension_reports_loaded_with_server_status(comfy_page):
    state = comfy_page.evaluate("() => window.FLENwheel")
    assert state["loaded"] is True
    assert state["server"] == {"pack": "FLENwheel", "version": "0.1.0"}
    assert state["version"] == "0.1.0"  # the front-end takes the server's version (pyproject's), no copy of its own
    assert comfy_page.evaluate("() => document.documentElement.dataset.flenwheel") == "loaded"


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "workflows").glob("*.json")))
def test_ui_workflow_converts_to_its_api_twin(comfy_page, name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    converted = comfy_page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf, true, false);
            const { output } = await window.app.graphToPrompt();
            return output;
        }""",
        ui,
    )
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in converted.items()}
    assert got == strip


def test_template_browser_shows_the_workflows_titles_and_descriptions(comfy_page):
    page = comfy_page
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.click("li:has-text('FLENwheel')")
    for path in sorted((REPO / "workflows").glob("*.json")):
        extra = json.loads(path.read_text())["extra"]
        card = page.locator(f'[data-testid="template-workflow-{path.stem}"]')
        card.scroll_into_view_if_needed()
        title, text = card.locator("h3"), card.locator("p")
        title.wait_for(state="visible")
        page.wait_for_function("([el, want]) => el.textContent === want", arg=[title.element_handle(), extra["title"]])
        assert title.is_visible() and text.text_content() == extra["description"]
        assert path.stem not in title.inner_text()  # not the bare file name
