"""Batch runs of the shipped workflows through ComfyUI's API queue, on one or several servers, resumable.

    python -m tools.queue_cli flywheel1_enrich --character alice --source-folder alice --seeds 1,2,3
    python -m tools.queue_cli flywheel1_synthesize --character alice --char-lora v2 --count 48 \\
        --server http://gpu1:8188 --server http://gpu2:8188
    python -m tools.queue_cli compare_versions --character alice --char-lora v1 --char-lora v2
    python -m tools.queue_cli path/to/api_workflow.json --set 3.steps=20 --set "Character LoRA.strength=0.8"

A batch is one job per (character × seed); jobs go round-robin to the servers, progress comes over each
server's websocket (/ws?clientId=…) as a bar on stderr, and where the outputs went is printed at the end.
The batch's state (per job: server, prompt_id, status, outputs) is kept in a JSON file (--state; by default
.flen_batches/<workflow>-<digest of the jobs>.json). Running the same command again resumes: a job whose
prompt shows success in the server's /history, or whose saved files still exist there, is not queued again;
a job still queued or running is followed, not re-queued.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

from engines.errors import FlenUserError
from engines.pack_info import API_WORKFLOWS_DIR
from engines.workspace import lora_name
from tools.comfy_queue import ComfyClient
from tools.tiny_workflows import load_api_workflow

BAR_WIDTH = 28


class CliError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------------

def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids matching a reference: an id, a title (_meta.title) or a class_type."""
    if ref in prompt:
        return [ref]
    by_title = [k for k, v in prompt.items() if v.get("_meta", {}).get("title") == ref]
    return by_title or [k for k, v in prompt.items() if v["class_type"] == ref]


def apply_set(prompt: dict, assignment: str) -> None:
    """--set NODE.INPUT=VALUE (NODE: id, title or class type; VALUE: JSON, else a string)."""
    target, sep, value = assignment.partition("=")
    node_ref, dot, name = target.rpartition(".")
    if not sep or not dot or not node_ref or not name:
        raise CliError(f"--set {assignment!r}: expected NODE.INPUT=VALUE, e.g. 3.steps=20")
    ids = _find_nodes(prompt, node_ref)
    if not ids:
        raise CliError(f"--set {assignment!r}: no node with id, title or type {node_ref!r} in the workflow")
    for node_id in ids:
        inputs = prompt[node_id]["inputs"]
        if name not in inputs:
            known = ", ".join(k for k, v in inputs.items() if not isinstance(v, list))
            raise CliError(f"--set {assignment!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                           f"{name!r}; its settable inputs: {known}")
        if isinstance(inputs[name], list):
            raise CliError(f"--set {assignment!r}: input {name!r} of node {node_id} is a link, not a value")
        inputs[name] = _parse_value(value)


def _lora_name(value: str, character: str | None, kind: str) -> str:
    """'v2' → flenwheel/<character>/<kind>_v2.safetensors; anything else is taken as the LoRA's name."""
    if value.startswith("v") and value[1:].isdigit():
        if not character:
            raise CliError(f"--{kind.replace('_', '-')} {value}: give --character to name the version's folder")
        try:
            return lora_name(character, f"{kind}_{value}.safetensors")
        except FlenUserError as exc:
            raise CliError(f"--character {character!r}: {exc}") from None
    return value


def _stacks_for(prompt: dict, kind: str) -> list[str]:
    return sorted((k for k, v in prompt.items() if v["class_type"] == "FLENLoraStack"
                   and f"{kind}_" in str(v["inputs"].get("lora_name", ""))), key=_id_key)


def _id_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def apply_shortcuts(prompt: dict, args: argparse.Namespace, character: str | None, seed: int | None,
                    shipped: dict | None = None) -> None:
    """The named shortcuts; LoRA stacks are found in the shipped workflow (before tiny substitutions)."""
    nodes = prompt.values()
    if character:
        for node in nodes:
            if "character" in node["inputs"] and not isinstance(node["inputs"]["character"], list):
                node["inputs"]["character"] = character
    if args.source_folder:
        found = [n for n in nodes if n["class_type"] == "LoadImageSetFromFolderNode"]
        if not found:
            raise CliError("--source-folder: this workflow has no source-folder node (LoadImageSetFromFolderNode)")
        for node in found:
            node["inputs"]["folder"] = args.source_folder
    for kind, values in (("char_lora", args.char_lora), ("qwen_lora", args.qwen_lora)):
        if not values:
            continue
        stacks = _stacks_for(shipped or prompt, kind)
        if not stacks:
            raise CliError(f"--{kind.replace('_', '-')}: this workflow has no FLEN LoRA Stack holding a {kind}")
        if len(values) not in (1, len(stacks)):
            raise CliError(f"--{kind.replace('_', '-')} given {len(values)} times; this workflow has {len(stacks)} "
                           f"{kind} stack(s): give one value, or one per stack (in node order {stacks})")
        for i, node_id in enumerate(stacks):
            prompt[node_id]["inputs"]["lora_name"] = _lora_name(values[min(i, len(values) - 1)], character, kind)
            prompt[node_id]["inputs"]["enabled"] = True
    if seed is not None:
        seeded = [n for n in nodes if isinstance(n["inputs"].get("seed"), int)]
        if not seeded:
            raise CliError("--seed/--seeds: this workflow has no node with a seed")
        for node in seeded:
            node["inputs"]["seed"] = seed
    if args.count is not None:
        counted = [n for n in nodes if n["class_type"] == "FLENFluxGenerate"]
        counted += [n for n in nodes if n["class_type"] == "FLENQwenEdit"]
        if not counted:
            raise CliError("--count: this workflow has no node with a count (FLEN FLUX Generate variations, "
                           "FLEN Qwen Edit batch)")
        for node in counted:
            node["inputs"]["variations" if node["class_type"] == "FLENFluxGenerate" else "batch"] = args.count


def load_workflow(ref: str, tiny: bool) -> tuple[str, dict]:
    path = Path(ref)
    if path.suffix == ".json" and path.is_file():
        prompt = json.loads(path.read_text(encoding="utf-8"))
        if "nodes" in prompt:
            raise CliError(f"{path} is a UI-format workflow; queue its API twin (workflows/api/) or convert it "
                           "with python -m tools.workflow_api")
        return path.stem, prompt
    if not (API_WORKFLOWS_DIR / f"{ref}.json").is_file():
        names = ", ".join(sorted(p.stem for p in API_WORKFLOWS_DIR.glob("*.json")))
        raise CliError(f"no shipped workflow {ref!r}; shipped: {names} (or give a path to an API-format .json)")
    return ref, load_api_workflow(ref, tiny=tiny)


def build_jobs(args: argparse.Namespace) -> tuple[str, list[dict]]:
    name, base = load_workflow(args.workflow, args.tiny)
    shipped = load_workflow(args.workflow, False)[1] if args.tiny else base
    characters = args.character or [None]
    seeds: list[int | None] = [None]
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    elif args.seed is not None:
        seeds = [args.seed + k for k in range(args.repeat)]
    elif args.repeat > 1:
        raise CliError("--repeat needs --seed (each repeat gets the next seed)")
    jobs = []
    for character in characters:
        for seed in seeds:
            prompt = json.loads(json.dumps(base))
            apply_shortcuts(prompt, args, character, seed, shipped)
            for assignment in args.set or []:
                apply_set(prompt, assignment)
            label = " ".join(x for x in (f"character={character}" if character else "",
                                         f"seed={seed}" if seed is not None else "") if x) or name
            jobs.append({"label": label, "prompt": prompt})
    return name, jobs


# ---------------------------------------------------------------------------------------------------------
# batch state
# ---------------------------------------------------------------------------------------------------------

def _digest(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Batch:
    path: Path
    workflow: str
    jobs: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: Path, workflow: str, jobs: list[dict]) -> Batch:
        old = {}
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            old = {j["digest"]: j for j in saved.get("jobs", [])}
        merged = []
        for job in jobs:
            digest = _digest(job["prompt"])
            prev = old.get(digest, {})
            merged.append({"label": job["label"], "digest": digest, "prompt": job["prompt"],
                           "status": prev.get("status", "new"), "server": prev.get("server"),
                           "prompt_id": prev.get("prompt_id"), "outputs": prev.get("outputs", []),
                           "error": prev.get("error")})
        batch = cls(path, workflow, merged)
        batch.save()
        return batch

    def save(self) -> None:
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".part")
            tmp.write_text(json.dumps({"workflow": self.workflow, "jobs": self.jobs}, indent=1, ensure_ascii=False),
                           encoding="utf-8")
            tmp.replace(self.path)

    def update(self, job: dict, **values) -> None:
        with self.lock:
            job.update(values)
        self.save()


def default_state_path(workflow: str, jobs: list[dict]) -> Path:
    digest = hashlib.sha256("".join(_digest(j["prompt"]) for j in jobs).encode()).hexdigest()[:12]
    return Path(".flen_batches") / f"{workflow}-{digest}.json"


# ---------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------

class Progress:
    """One line on stderr: jobs done / total, and what each server is doing now."""

    def __init__(self, total: int, done: int, stream=None):
        self.total, self.done, self.stream = total, done, stream or sys.stderr
        self.now: dict[str, str] = {}
        self.lock = threading.Lock()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def set(self, server: str, text: str) -> None:
        with self.lock:
            self.now[server] = text
        self.draw()

    def finish_job(self, server: str) -> None:
        with self.lock:
            self.done += 1
            self.now.pop(server, None)
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        with self.lock:
            filled = int(BAR_WIDTH * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            detail = " | ".join(f"{s}: {t}" for s, t in sorted(self.now.items()))
            line = f"[{bar}] {self.done}/{self.total} jobs" + (f" | {detail}" if detail else "")
            if line == self._last and not force:
                return
            self._last = line
            if self.tty:
                self.stream.write("\r\x1b[2K" + line[:200])
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------

def _short(url: str) -> str:
    return url.split("://", 1)[-1]


def _outputs_of(entry: dict) -> list[dict]:
    files = []
    for node_id, out in (entry.get("outputs") or {}).items():
        for key in ("images", "gifs", "videos", "audio"):
            for item in out.get(key, []) or []:
                if isinstance(item, dict) and item.get("type") == "output":
                    files.append({"node": node_id, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": "output"})
        for text in out.get("text", []) or []:
            for line in str(text).splitlines():
                if line.startswith("saved "):
                    files.append({"node": node_id, "path": line[len("saved "):].strip()})
    return files


def _already_done(client: ComfyClient, job: dict) -> bool:
    """Success in /history, or (history gone, e.g. a restarted server) every saved file still there."""
    if not job.get("prompt_id"):
        return False
    if client.prompt_state(job["prompt_id"]) == "success":
        return True
    saved = [o for o in job.get("outputs", []) if "filename" in o]
    return job.get("status") == "done" and bool(saved) and all(client.output_exists(o) for o in saved)


def _follow(client: ComfyClient, batch: Batch, jobs: list[dict], progress: Progress, timeout: float) -> None:
    """Queues this server's jobs and follows them over its websocket (polling /history as a back-up)."""
    server = _short(client.url)
    ws = websocket.WebSocket()
    ws.connect(client.ws_url, timeout=30)
    ws.settimeout(1.0)
    try:
        waiting: dict[str, dict] = {}
        for job in jobs:
            pid = job.get("prompt_id")
            if job["status"] == "running" and pid and client.prompt_state(pid) == "queued":
                waiting[job["prompt_id"]] = job  # queued by an earlier invocation, still in the queue: follow it
                continue
            pid = client.queue(job["prompt"])
            batch.update(job, status="running", prompt_id=pid, server=client.url, outputs=[], error=None)
            waiting[pid] = job
        nodes = {}
        deadline = time.monotonic() + timeout
        last_poll = 0.0
        while waiting:
            if time.monotonic() > deadline:
                raise CliError(f"{server}: {len(waiting)} job(s) not finished within {timeout:.0f} s")
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                raw = None
            poll = raw is None or time.monotonic() - last_poll > 2.0
            if isinstance(raw, str):
                msg = json.loads(raw)
                kind = msg.get("type")
                data: dict[str, Any] = msg.get("data") or {}
                pid = data.get("prompt_id")
                followed = waiting.get(pid) if pid is not None else None
                if kind in ("execution_success", "execution_error", "execution_interrupted"):
                    poll = True
                elif followed is not None and kind == "executing":
                    if data.get("node") is None:
                        poll = True
                    else:
                        node = followed["prompt"].get(str(data["node"]), {})
                        nodes[pid] = f"{followed['label']}: {node.get('class_type', data['node'])}"
                        progress.set(server, nodes[pid])
                elif followed is not None and kind == "progress":
                    progress.set(server, f"{nodes.get(pid, followed['label'])} {data.get('value')}/{data.get('max')}")
            if poll:
                last_poll = time.monotonic()
                for pid, job in list(waiting.items()):
                    entry = client.history_entry(pid)
                    if not entry or entry.get("status", {}).get("completed") is None:
                        continue
                    del waiting[pid]
                    status = entry["status"]
                    if status.get("status_str") == "error" or not status.get("completed"):
                        err: dict[str, Any] = next(
                            (d for k, d in status.get("messages", []) if k == "execution_error"), {})
                        batch.update(job, status="error", error=f"node {err.get('node_id')} "
                                     f"({err.get('node_type')}): {err.get('exception_message', status)}")
                    else:
                        batch.update(job, status="done", outputs=_outputs_of(entry))
                    progress.finish_job(server)
    finally:
        ws.close()


def run_batch(batch: Batch, servers: list[str], progress_stream=None, timeout: float = 24 * 3600) -> dict:
    clients = {url: ComfyClient(url.rstrip("/")) for url in servers}
    skipped = 0
    todo: list[dict] = []
    for job in batch.jobs:
        client = clients.get(job.get("server") or "") or next(iter(clients.values()))
        if job.get("prompt_id") and job.get("server") in clients and _already_done(client, job):
            if job["status"] != "done":
                entry = client.history_entry(job["prompt_id"]) or {}
                batch.update(job, status="done", outputs=_outputs_of(entry))
            skipped += 1
            continue
        todo.append(job)
    plan: dict[str, list[dict]] = {url: [] for url in clients}
    free = [url for url in clients]
    for i, job in enumerate(todo):  # a job still queued on its server stays there; the rest go round-robin
        if job["status"] == "running" and job.get("server") in clients:
            plan[job["server"]].append(job)
        else:
            plan[free[i % len(free)]].append(job)
    progress = Progress(len(batch.jobs), skipped, progress_stream)
    progress.draw(force=True)
    errors: list[BaseException] = []

    def work(url: str) -> None:
        try:
            _follow(clients[url], batch, plan[url], progress, timeout)
        except BaseException as exc:  # reported after every server stopped
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(url,), daemon=True) for url in clients if plan[url]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    if errors:
        raise errors[0]
    return {"skipped": skipped, "queued": len(todo), "failed": sum(j["status"] == "error" for j in batch.jobs)}


def report(batch: Batch, summary: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"{batch.workflow}: {len(batch.jobs)} job(s); {summary['queued']} queued now, {summary['skipped']} already "
          f"done (skipped), {summary['failed']} failed. State: {batch.path}", file=out)
    for job in batch.jobs:
        print(f"- {job['label']}: {job['status']} (prompt {job.get('prompt_id')} on {job.get('server')})", file=out)
        if job.get("error"):
            print(f"    error: {job['error']}", file=out)
        for o in job.get("outputs", []):
            where = o.get("path") or "/".join(x for x in ("output", o.get("subfolder"), o.get("filename")) if x)
            print(f"    {where}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.queue_cli", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("workflow", help="A shipped workflow name (workflows/api/<name>.json) or an API-format file.")
    parser.add_argument("--server", action="append", help="ComfyUI URL; repeat for several (round-robin). "
                                                          "Default http://127.0.0.1:8188.")
    parser.add_argument("--character", action="append", help="Character name (every 'character' input); repeat "
                                                             "to queue the batch for several characters.")
    parser.add_argument("--source-folder", help="Folder of source photos under ComfyUI's input/ (the Source photos "
                                                "node).")
    parser.add_argument("--char-lora", action="append", help="Character LoRA version (v2, or a name under "
                                                             "models/loras); repeat for each char_lora stack in order.")
    parser.add_argument("--qwen-lora", action="append", help="Editor LoRA version for the enrichment stack (v1, or "
                                                             "a name); switches that stack entry on.")
    parser.add_argument("--seed", type=int, help="Seed of every seeded node (with --repeat N: N jobs, seed, seed+1…).")
    parser.add_argument("--seeds", help="Comma-separated seeds: one job each.")
    parser.add_argument("--repeat", type=int, default=1, help="Jobs per character, with consecutive seeds.")
    parser.add_argument("--count", type=int, help="How many images: FLEN FLUX Generate variations / Qwen Edit batch.")
    parser.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                        help="Any input: NODE is a node id, title or class type; VALUE is JSON or a string.")
    parser.add_argument("--state", type=Path, help="Batch state file (default .flen_batches/<workflow>-<digest>.json).")
    parser.add_argument("--tiny", action="store_true", help="Apply the tiny-model substitutions (demo / tests).")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="Seconds to wait for the whole batch.")
    parser.add_argument("--dry-run", action="store_true", help="Print the jobs' prompts and queue nothing.")
    args = parser.parse_args(argv)
    try:
        name, jobs = build_jobs(args)
        if args.dry_run:
            print(json.dumps([j["prompt"] for j in jobs], indent=1, ensure_ascii=False))
            return 0
        batch = Batch.open(args.state or default_state_path(name, jobs), name, jobs)
        summary = run_batch(batch, args.server or ["http://127.0.0.1:8188"], timeout=args.timeout)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(batch, summary)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
