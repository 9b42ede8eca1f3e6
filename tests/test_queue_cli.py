"""python -m tools.queue_cli against a real ComfyUI: overrides, websocket progress, outputs, resume."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tools import queue_cli
from tools.comfy_queue import ComfyClient, ComfyServer, prepare_base_directory

pytestmark = pytest.mark.server


def _history(comfy) -> dict:
    return comfy.get("/history", params={"max_items": 10000}).json()


def test_queues_with_overrides_shows_progress_and_resumes(comfy, comfy_server, tmp_path, capsys):
    state = tmp_path / "batch.json"
    argv = ["flen_synthetic_flux", "--tiny", "--server", comfy_server.url, "--server", comfy_server.url + "/",
            "--seeds", "101,102", "--char-lora", "flen-tiny/flux_lora_b.safetensors", "--set", "4.steps=1",
            "--set", "Save Image.filename_prefix=cli/synth", "--set", "Character LoRA.strength=0.9",
            "--state", str(state)]
    # the shipped stack "2" names char_lora_v1: --char-lora replaces it; its strength is set by its title
    before = set(_history(comfy))
    assert queue_cli.main(argv) == 0
    out, err = capsys.readouterr()
    new = {pid: e for pid, e in _history(comfy).items() if pid not in before}
    assert len(new) == 2
    prompts = [e["prompt"][2] for e in new.values()]
    assert sorted(p["4"]["inputs"]["seed"] for p in prompts) == [101, 102]
    assert all(p["4"]["inputs"]["steps"] == 1 and p["5"]["inputs"]["filename_prefix"] == "cli/synth" for p in prompts)
    assert all(p["2"]["inputs"]["lora_name"] == "flen-tiny/flux_lora_b.safetensors" for p in prompts)
    assert all(p["2"]["inputs"]["strength"] == 0.9 for p in prompts)
    assert "[" + "#" * queue_cli.BAR_WIDTH + "] 2/2 jobs" in err   # the bar reached the end
    assert re.search(r"seed=10[12]: FLENFluxGenerate \d+/\d+", err), err  # websocket progress of a node
    saved = json.loads(state.read_text())
    assert [j["status"] for j in saved["jobs"]] == ["done", "done"]
    for job in saved["jobs"]:
        for o in job["outputs"]:
            assert (comfy_server.base / "output" / o["subfolder"] / o["filename"]).is_file()
            assert f"output/{o['subfolder']}/{o['filename']}" in out
    assert "2 queued now, 0 already done" in out

    # the same command again: nothing is re-run
    assert queue_cli.main(argv) == 0
    out, _ = capsys.readouterr()
    assert "0 queued now, 2 already done (skipped)" in out
    assert len(set(_history(comfy)) - before) == 2

    # a batch cut short: one job never got queued → only that one runs
    saved["jobs"][1].update(status="new", prompt_id=None, outputs=[])
    state.write_text(json.dumps(saved))
    assert queue_cli.main(argv) == 0
    out, _ = capsys.readouterr()
    assert "1 queued now, 1 already done (skipped)" in out
    assert len(set(_history(comfy)) - before) == 3


@pytest.fixture(scope="module")
def second_server(tmp_path_factory, tiny_models):
    """Another real ComfyUI with its own folders, so which server ran which job is beyond doubt."""
    base = tmp_path_factory.mktemp("comfy_base_second")
    prepare_base_directory(base, tiny_models)
    server = ComfyServer(base, python=sys.executable).start()
    yield server
    server.stop()


def test_jobs_go_round_robin_to_two_servers_and_count_sets_the_images_per_job(comfy, comfy_server, second_server,
                                                                              tmp_path):
    servers = {comfy_server.url: (comfy, comfy_server), second_server.url: (ComfyClient(second_server.url),
                                                                            second_server)}
    before = {url: set(_history(client)) for url, (client, _) in servers.items()}
    argv = ["flen_synthetic_flux", "--tiny", "--server", comfy_server.url, "--server", second_server.url,
            "--seeds", "201,202,203,204", "--count", "2", "--set", "4.steps=1",
            "--set", "Save Image.filename_prefix=cli/rr", "--state", str(tmp_path / "rr.json")]
    assert queue_cli.main(argv) == 0
    seeds = {}
    for url, (client, server) in servers.items():
        new = [e for pid, e in _history(client).items() if pid not in before[url]]
        seeds[url] = sorted(e["prompt"][2]["4"]["inputs"]["seed"] for e in new)
        for entry in new:
            assert entry["prompt"][2]["4"]["inputs"]["variations"] == 2
            images = entry["outputs"]["5"]["images"]
            assert len(images) == 2  # --count 2: two images per job
            for img in images:
                assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()
    assert seeds == {comfy_server.url: [201, 203], second_server.url: [202, 204]}
    saved = json.loads((tmp_path / "rr.json").read_text())
    assert [j["server"] for j in saved["jobs"]] == [comfy_server.url, second_server.url] * 2
    assert all(len(j["outputs"]) == 2 for j in saved["jobs"])


def test_character_and_folder_shortcuts_reach_every_node(tmp_path):
    args = ["flywheel1_enrich", "--character", "alice", "--character", "bob", "--source-folder", "alice_src",
            "--qwen-lora", "v3", "--seed", "7", "--repeat", "2"]
    parsed = queue_cli.argparse.Namespace(**{**vars(_parser_defaults()), **_parse(args)})
    name, jobs = queue_cli.build_jobs(parsed)
    assert name == "flywheel1_enrich" and len(jobs) == 4
    p = jobs[3]["prompt"]
    # the one FLEN Character node gets it; the queue's character input stays linked to that node
    assert p["13"]["inputs"]["character"] == "bob" and p["1"]["inputs"]["folder"] == "alice_src"
    assert p["10"]["inputs"]["character"] == ["13", 0]
    assert p["7"]["inputs"] == {**p["7"]["inputs"], "lora_name": "flenwheel/bob/qwen_lora_v3.safetensors",
                                "enabled": True}
    assert p["8"]["inputs"]["seed"] == 8


def test_bad_overrides_are_clear_errors(capsys):
    assert queue_cli.main(["flen_synthetic_flux", "--set", "4.nope=1", "--dry-run"]) == 2
    assert "has no input 'nope'" in capsys.readouterr().err
    assert queue_cli.main(["flen_synthetic_flux", "--set", "4.flux_pipe=1", "--dry-run"]) == 2
    assert "is a link" in capsys.readouterr().err
    assert queue_cli.main(["no_such_workflow", "--dry-run"]) == 2
    assert "flywheel1_enrich" in capsys.readouterr().err


def _parse(argv):
    ns = {}
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("workflow")
    for flag in ("--character", "--char-lora", "--qwen-lora", "--set", "--server"):
        parser.add_argument(flag, action="append")
    parser.add_argument("--source-folder")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--repeat", type=int, default=1)
    ns.update({k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None})
    return ns


def _parser_defaults():
    return queue_cli.argparse.Namespace(workflow=None, server=None, character=None, source_folder=None,
                                        char_lora=None, qwen_lora=None, seed=None, seeds=None, repeat=1, count=None,
                                        set=None, state=None, tiny=False, timeout=60, dry_run=False)
