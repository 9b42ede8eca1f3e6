"""Host memory of loading a transformer as fp8: diffusers' ``from_pretrained`` in bf16 followed by
``convert_linears_to_fp8`` (the pack's loaders before) against ``load_transformer_fp8`` (quantised while reading).

    python benchmarks/bench_fp8_load.py [--layers 4] [--shards 2] [--folder DIR]

Writes a random-weight Qwen-Image transformer at full width with ``--layers`` of its 60 blocks as a sharded
diffusers checkpoint (bf16), then loads it both ways, each in a fresh process, and prints one JSON line per way:
peak anonymous resident memory (RssAnon sampled every 5 ms), peak resident memory with the checkpoint's
file pages that safetensors maps (VmHWM; the kernel can drop those, but they crowd the page cache), seconds,
and the checkpoint's size. No GPU needed.
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


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_anon_mib() -> float:
    return status_mib("RssAnon")


def write_checkpoint(folder: Path, layers: int, shards: int) -> float:
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=layers).to(torch.bfloat16)
    shard_mb = int(sum(p.numel() * 2 for p in model.parameters()) / shards / 1e6) + 1
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    return sum(p.numel() for p in model.parameters()) / 1e9


def load(way: str, folder: Path) -> None:
    import torch
    from diffusers import QwenImageTransformer2DModel

    sys.path.insert(0, str(ROOT))
    from engines.fp8_linear import convert_linears_to_fp8, load_transformer_fp8

    peak = [rss_anon_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.005)

    start_mib, start_hwm = peak[0], status_mib("VmRSS")
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t = time.perf_counter()
    if way == "from_pretrained_then_convert":
        model = QwenImageTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
        convert_linears_to_fp8(model, torch.bfloat16)
    else:
        model = load_transformer_fp8(QwenImageTransformer2DModel, folder, torch.bfloat16)
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"way": way, "peak_rss_anon_mib": round(peak[0] - start_mib),
                      "peak_rss_with_file_pages_mib": round(status_mib("VmHWM") - start_hwm), "model_mib": round(held),
                      "seconds": round(seconds, 2)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--folder", type=Path)
    p.add_argument("--load", choices=["from_pretrained_then_convert", "load_transformer_fp8"])
    a = p.parse_args()
    if a.load:
        load(a.load, a.folder)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder or Path(tmp) / "transformer"
        params_b = write_checkpoint(folder, a.layers, a.shards)
        size_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        print(json.dumps({"checkpoint": "random Qwen-Image transformer, full width", "layers": a.layers,
                          "params_b": round(params_b, 3), "bf16_mib": round(size_mib),
                          "shards": len(list(folder.glob("*.safetensors")))}), flush=True)
        for way in ("from_pretrained_then_convert", "load_transformer_fp8"):
            subprocess.run([sys.executable, __file__, "--load", way, "--folder", str(folder)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
