"""Host memory of loading ComfyUI's fp8 split files (the split-file loaders' ``auto`` precision).

    python benchmarks/bench_split_load.py [--flux-blocks 2 4] [--qwen-layers 4] [--form scaled|e4m3fn]

Writes a random-weight FLUX.1-dev and Qwen-Image-Edit transformer at full width and reduced depth as one ComfyUI
fp8 diffusion-model file each (BFL names for FLUX; block weights e4m3 — with ``scale_weight`` for the scaled form —
the rest bf16, as ComfyUI's fp8 files are), then loads each with ``engines.split_files`` in a fresh process and
prints one JSON line per model: peak anonymous resident memory (RssAnon sampled every 5 ms), peak resident memory
including the file pages safetensors maps (VmHWM; the kernel can drop those), the loaded model's bytes, seconds,
and the same figures scaled to the full depth (per block, from the shipped config). No GPU needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_file(arch: str, path: Path, depth: tuple[int, ...], form: str) -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from engines import split_files as sf
    from tools import tiny_split_files as ts

    if arch == "flux":
        cfg = dict(sf.shipped_config(sf.FLUX_CONFIGS, "transformer"), num_layers=depth[0], num_single_layers=depth[1])
        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(cfg)
    else:
        cfg = dict(sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "transformer"), num_layers=depth[0])
        with init_empty_weights():
            model = QwenImageTransformer2DModel.from_config(cfg)
    torch.manual_seed(0)
    sd = {k: (torch.randn(v.shape, dtype=torch.bfloat16) * 0.02) for k, v in model.state_dict().items()}
    if arch == "flux":
        sd = ts.flux_to_bfl(sd, depth[0], depth[1])
    sd = ts.to_fp8(sd, scaled=form == "scaled")
    ts.write_safetensors(path, sd, {})
    return {"params_b": round(sum(v.numel() for v in sd.values()) / 1e9, 3),
            "file_mib": round(path.stat().st_size / 2**20)}


def load(arch: str, path: Path) -> None:
    import torch

    from engines import split_files as sf

    peak = [status_mib("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], status_mib("RssAnon"))
            time.sleep(0.005)

    start_anon, start_hwm = peak[0], status_mib("VmRSS")
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t = time.perf_counter()
    dtypes = sf.file_dtypes("bf16", torch.device("cpu"))  # what 'auto' does on a GPU: fp8 kept, rest bf16
    model = (sf.load_flux_transformer if arch == "flux" else sf.load_qwen_transformer)(path, dtypes)
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn) / 1e9
    print(json.dumps({"peak_rss_anon_mib": round(peak[0] - start_anon),
                      "peak_rss_with_file_pages_mib": round(status_mib("VmHWM") - start_hwm),
                      "model_mib": round(held), "fp8_params_b": round(fp8, 3), "seconds": round(seconds, 2)}),
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--flux-blocks", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"))
    p.add_argument("--qwen-layers", type=int, default=4)
    p.add_argument("--form", choices=["scaled", "e4m3fn"], default="scaled")
    p.add_argument("--load", choices=["flux", "qwen"])
    p.add_argument("--file", type=Path)
    a = p.parse_args()
    if a.load:
        load(a.load, a.file)
        return 0
    full = {"flux": (19, 38), "qwen": (60,)}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, depth in (("flux", tuple(a.flux_blocks)), ("qwen", (a.qwen_layers,))):
            path = Path(tmp) / f"{arch}.safetensors"
            info = write_file(arch, path, depth, a.form)
            r = subprocess.run([sys.executable, __file__, "--load", arch, "--file", str(path)], check=True,
                               capture_output=True, text=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            path.unlink()
            print(json.dumps({"model": arch, "form": a.form, "depth": depth, **info, **row}), flush=True)
            # full depth: the same per-block cost (FLUX: a single block is 15/36 of a double block's weights)
            units = (lambda d: d[0] + d[1] * 15 / 36) if arch == "flux" else (lambda d: d[0])
            scale = units(full[arch]) / units(depth)
            print(json.dumps({"model": arch, "extrapolated_to_depth": full[arch],
                              "model_gib": round(row["model_mib"] * scale / 1024, 1),
                              "peak_rss_anon_gib": round((row["peak_rss_anon_mib"] - row["model_mib"]
                                                          + row["model_mib"] * scale) / 1024, 1),
                              "file_gib": round(info["file_mib"] * scale / 1024, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
