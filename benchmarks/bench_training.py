"""GPU benchmark of the real LoRA trainer (training.lora_training.Trainer) on full-size random-weight
FLUX.1-dev / Qwen-Image-Edit-2509 transformers under a VRAM cap: seconds per step and peak VRAM of
everything the trainer holds. Mirrors ../shared/bench/baseline_lora_step.py (NF4 base on CUDA, rank 16,
gradient checkpointing, 8-bit AdamW, batch 1, pre-cached latents and text embeddings) so that the two
can be run side by side in the same session.

usage: python -m benchmarks.bench_training --model flux|qwen --res 512|1024 [--cap 24] [--steps 5]
       [--rank 16] [--tiny] [--base nf4|fp8] [--ckpt-blocks N] [--compile]
       [--run-dir DIR --examples 15 --checkpoint-every 250]
--base fp8: every Linear but the outer ones an e4m3 Fp8Linear (what a ComfyUI fp8 split file trains on, with fp8
matmuls forward and backward on cards that have them) instead of the baseline's NF4. --ckpt-blocks N: only the
first N transformer blocks recompute their activations in backward (-1, the default: all, as the baseline).
--compile: torch.compile every transformer block (TrainConfig.compile_blocks); the two warm-up steps absorb the
compilation, which total_s includes.
--run-dir DIR: a whole run as a user's, timed end to end: exactly --steps steps (no warm-up added) over --examples
distinct pre-cached examples (15 photos' latents and captions), a resumable checkpoint every --checkpoint-every steps
and the LoRA written at the end, all in DIR, which is kept; progress lines go to DIR/progress.jsonl as it runs.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.lora_training import Example, TrainConfig, Trainer, TrainTask, fuse_for_training  # noqa: E402
from training.train_char_lora import flux_predict  # noqa: E402
from training.train_editor_lora import qwen_edit_predict  # noqa: E402


def build_transformer(model: str, tiny: bool, device: torch.device, base: str = "nf4") -> torch.nn.Module:
    """Random weights materialised directly on the device in bf16; every Linear NF4 on CUDA (as the baseline), or
    with ``base="fp8"`` e4m3 (engines.fp8_linear, skipping the layers its loader skips), one layer at a time."""
    import re

    import torch.nn as nn
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cuda = device.type == "cuda"
    if model == "flux":
        cfg = dict(guidance_embeds=True)
        if tiny:
            cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        with init_empty_weights(include_buffers=False):
            m = FluxTransformer2DModel(**cfg)
    else:
        cfg = {}
        if tiny:
            cfg.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=(4, 6, 6))
        with init_empty_weights(include_buffers=False):
            m = QwenImageTransformer2DModel(**cfg)

    def rand(shape):
        return torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02

    if cuda:
        import bitsandbytes as bnb

    from engines.fp8_linear import SKIP_PATTERNS, Fp8Linear, share_sibling_casts

    skip = [re.compile(p) for p in SKIP_PATTERNS]

    def materialise(mod, prefix=""):
        for name, child in list(mod.named_children()):
            qual = f"{prefix}{name}"
            if type(child) is nn.Linear and base == "fp8" and not any(p.search(qual) for p in skip):
                q = Fp8Linear(child.in_features, child.out_features, child.bias is not None, torch.bfloat16,
                              device=device)
                q.set_weight(rand(child.weight.shape))
                if child.bias is not None:
                    q.bias = nn.Parameter(rand(child.bias.shape), requires_grad=False)
                setattr(mod, name, q)
            elif isinstance(child, nn.Linear) and cuda and base == "nf4":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(rand(child.weight.shape), requires_grad=False, quant_type="nf4").to(device)
                if child.bias is not None:
                    q.bias = nn.Parameter(rand(child.bias.shape), requires_grad=False)
                setattr(mod, name, q)
            else:
                materialise(child, qual + ".")
        for pname, prm in list(mod._parameters.items()):
            if prm is not None and prm.device.type == "meta":
                mod._parameters[pname] = nn.Parameter(rand(prm.shape), requires_grad=False)

    materialise(m)
    if base == "fp8":
        share_sibling_casts(m)
    fuse_for_training(m)  # as training.lora_training.load_transformer does
    return m.to(device)


class BenchTask(TrainTask):
    prefix = "bench_lora"
    trainer_name = "benchmarks.bench_training"
    character = "bench"

    def __init__(self, cfg: TrainConfig, model: str, res: int, tiny: bool, base: str = "nf4",
                 examples: int = 1) -> None:
        super().__init__(cfg)
        self.model, self.res, self.tiny, self.base, self.examples = model, res, tiny, base, examples
        self.architecture = model

    def cache_key(self):
        return {"bench": self.model, "res": self.res, "tiny": self.tiny, "examples": self.examples}

    def encode(self, device, dtype):  # pre-cached inputs, as in the baseline
        lat = self.res // 8
        g = torch.Generator().manual_seed(0)
        out = []
        for i in range(self.examples):
            if self.model == "flux":
                txt, jd, pooled = (16, 32, 32) if self.tiny else (512, 4096, 768)
                cond = {"prompt_embeds": torch.randn(txt, jd, generator=g),
                        "pooled": torch.randn(pooled, generator=g)}
                z = torch.randn(16, lat, lat, generator=g)
            else:
                txt, jd = (16, 32) if self.tiny else (256, 3584)
                z = torch.randn(16, lat, lat, generator=g)
                cond = {"prompt_embeds": torch.randn(txt, jd, generator=g), "prompt_mask": torch.ones(txt).long(),
                        "control": torch.randn((lat // 2) ** 2, 64, generator=g),
                        "control_shapes": torch.tensor([[1, lat // 2, lat // 2]])}
            out.append(Example(f"bench_{i:02d}", (self.res, self.res), z, cond))
        return out, []

    def load_transformer(self, device, dtype):
        return build_transformer(self.model, self.tiny, device, self.base)

    def predict(self, transformer, noisy, t, cond):
        if self.model == "flux":
            return flux_predict(transformer, noisy, t, cond, 1.0)
        return qwen_edit_predict(transformer, noisy, t, cond)


def bench_config(a: argparse.Namespace, run_dir: str, steps: int, checkpoint_every: int) -> TrainConfig:
    """The trainer's settings for the baseline's workload: NF4 on CUDA (else bf16), no samples."""
    cuda = torch.cuda.is_available()
    return TrainConfig(model="random-weights", dataset="random", output_dir=run_dir, run_dir=run_dir,
                       precision="nf4" if cuda and a.base == "nf4" else "bf16", rank=a.rank,
                       checkpoint_blocks=a.ckpt_blocks, compile_blocks=a.compile, steps=steps, resolution=a.res,
                       checkpoint_every=checkpoint_every, sample_every=0, memory_cap_gb=a.cap if cuda else 0.0)


def header(a: argparse.Namespace) -> dict:
    """The fields every result line of this benchmark starts with."""
    return {"model": a.model + ("-edit" if a.model == "qwen" else ""), "res": a.res, "rank": a.rank,
            "cap_gb": a.cap, "base": a.base, "ckpt_blocks": a.ckpt_blocks, "compile": a.compile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["flux", "qwen"], required=True)
    p.add_argument("--res", type=int, required=True)
    p.add_argument("--cap", type=float, default=24.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--base", choices=["nf4", "fp8"], default="nf4")
    p.add_argument("--ckpt-blocks", type=int, default=-1)
    p.add_argument("--compile", action="store_true", help="compile every transformer block (compile_blocks)")
    p.add_argument("--run-dir", default="", help="a whole run, timed end to end, kept in this folder")
    p.add_argument("--examples", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=250)
    a = p.parse_args(argv)
    if a.run_dir:
        return whole_run(a)
    cuda = torch.cuda.is_available()
    events: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(a, tmp, steps=a.steps + 2, checkpoint_every=0)
        res = {"bench": "real_trainer", **header(a), "tiny": a.tiny}
        t0 = time.time()
        try:
            trainer = Trainer(BenchTask(cfg, a.model, a.res, a.tiny, a.base), Path(tmp),
                              emit_fn=lambda ev, **d: events.append({"event": ev, "t": time.time(), **d}))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer.run()
            steps = [e for e in events if e["event"] == "step"]
            timed = steps[2:]  # two warm-up steps, as the baseline
            res["s_per_step"] = round((timed[-1]["t"] - steps[1]["t"]) / len(timed), 3)
            res["step_s"] = [round(b["t"] - a["t"], 3) for a, b in zip(steps[1:-1], timed, strict=True)]
            res["final_loss"] = steps[-1]["loss"]
            if cuda:
                res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
                res["gpu"] = torch.cuda.get_device_name(0)
        except torch.OutOfMemoryError as e:
            res["oom"] = str(e).splitlines()[0][:200]
        res["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(res), flush=True)
    return 0


def whole_run(a: argparse.Namespace) -> int:
    """A user's run: --steps steps over --examples examples, checkpoints and the LoRA file included, timed from the
    trainer's start (the transformer's load) to the written LoRA; progress lines appended as it goes."""
    cuda = torch.cuda.is_available()
    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = (run_dir / "progress.jsonl").open("a", encoding="utf-8")
    t0 = time.time()
    marks: dict[str, float] = {}

    def emit(ev: str, **d) -> None:
        now = time.time() - t0
        if ev == "step":
            marks.setdefault("first_step_s", now)
            if d["step"] % 50 == 0 or d["step"] == a.steps:
                progress.write(json.dumps({"step": d["step"], "t": round(now, 1), "loss": d.get("loss"),
                                           "peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2)
                                           if cuda else None}) + "\n")
                progress.flush()
        elif ev in ("checkpoint", "saved", "done", "resume"):
            progress.write(json.dumps({"event": ev, "t": round(now, 1)}) + "\n")
            progress.flush()

    cfg = bench_config(a, str(run_dir), steps=a.steps, checkpoint_every=a.checkpoint_every)
    res: dict = {"bench": "whole_run", **header(a), "steps": a.steps, "examples": a.examples,
                 "checkpoint_every": a.checkpoint_every}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Trainer(BenchTask(cfg, a.model, a.res, a.tiny, a.base, a.examples), run_dir, emit_fn=emit).run()
    res["total_s"] = round(time.time() - t0, 1)
    res["first_step_s"] = round(marks.get("first_step_s", 0.0), 1)
    res["loras"] = sorted(str(f.relative_to(run_dir)) for f in run_dir.rglob("*.safetensors")
                          if not {"checkpoints", "cache"} & set(f.parts))
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        res["gpu"] = torch.cuda.get_device_name(0)
    progress.close()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
