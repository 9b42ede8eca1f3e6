"""Child processes that train: started in their own process group, read line by line, stopped as a group.

A trainer (the pack's own, or ai-toolkit) may hold the GPU and start dataloader workers of its own; an
interrupted prompt must leave none of them behind, so each child leads a new session and is stopped by
signalling its whole group (SIGTERM, a grace period, then SIGKILL for whatever is left). Commands are
argument lists, never a shell. Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeGuard

_LINE_END = re.compile(rb"[\r\n]")  # tqdm redraws its bar after a bare \r


def start(cmd: list[str], cwd: str | os.PathLike, *, merge_stderr: bool = False,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts ``cmd`` (an argument list) in ``cwd`` as the leader of a new process group, unbuffered, with
    binary pipes for stdout (and stderr, or stderr into stdout when ``merge_stderr``), stdin closed."""
    full_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    kwargs: dict[str, Any] = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return subprocess.Popen(cmd, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, env=full_env, **kwargs)


def read_lines(stream: IO[bytes], on_line: Callable[[str], None], *, sink: IO[bytes] | None = None,
               on_end: Callable[[], None] | None = None, name: str = "child-output") -> threading.Thread:
    """A daemon thread that reads ``stream`` to its end and calls ``on_line`` with each line (split at \\n and
    \\r, decoded as UTF-8 with replacement, without its end), then ``on_end``; ``sink`` gets every byte as
    read (a log)."""
    def run() -> None:
        buf = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            if sink is not None:
                sink.write(chunk)
                sink.flush()
            buf += chunk
            *parts, buf = _LINE_END.split(buf)
            for raw in parts:
                on_line(raw.decode("utf-8", errors="replace"))
        if buf:
            on_line(buf.decode("utf-8", errors="replace"))
        if on_end is not None:
            on_end()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def tail(lines: int) -> collections.deque[str]:
    """The last ``lines`` lines kept for an error message."""
    return collections.deque(maxlen=lines)


def kill_group(pid: int, sig: int) -> None:
    """``sig`` to the process group ``pid`` leads; nothing when it is gone or not ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "posix":
            os.killpg(pid, sig)
        else:  # pragma: no cover
            os.kill(pid, signal.SIGTERM)


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds to whatever of the group is left
    (workers may outlive the leader), and reaps the child."""
    if proc.poll() is None:
        kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    kill_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(grace, 5.0))


def pid_alive(pid: object) -> TypeGuard[int]:
    """Whether ``pid`` runs (a zombie does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if os.name == "posix" and not Path("/proc/self").exists():  # pragma: no cover - no procfs
            try:
                os.kill(pid, 0)
                return True
            except (ProcessLookupError, PermissionError):
                return False
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, grace: float) -> bool:
    """Stops the process group led by ``pid``, which is not our child (a trainer left by a crashed server):
    SIGTERM, then SIGKILL after ``grace`` seconds. True when it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        kill_group(pid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pid_alive(pid):
            return True
    return False
