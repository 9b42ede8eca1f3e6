"""GPU benchmark: FLENwheel's Qwen-Image-Edit-2509 edit (engines/qwen_edit.py) on random full-size weights.

    python benchmarks/bench_qwen_edit.py --kit KIT_DIR [--res 1024] [--cap 24] [--precision fp8]
                                          [--loras 0 2] [--small] [--forward-ablation]

KIT_DIR holds a tokenizer/, processor/ and scheduler/ (the tiny-model kit's are fine: token ids are
all that reaches the model) and text_encoder_config.json or text_encoder/config.json (its token ids are
kept, sizes set to Qwen2.5-VL-7B): the kit's tiny Qwen-Image-Edit folder will do. The transformer
(20.4 B), VAE and text encoder (8.3 B) are built at full size with random weights: no download. The
memory cap plays a 24 GB card; the host plays ComfyUI's VRAM manager on such a card: only the running
stage's modules stay on the GPU (the 7B text encoder and the fp8 transformer do not fit together), so
each image pays the swaps, which are timed apart.
Each configuration prints one JSON line: seconds per image at 8 steps (true CFG off, the Lightning
set-up) and 40 steps (true CFG 4), seconds per denoising step, swap seconds, peak GiB; then a
5-angle sweep (one encoder stage for all five, as FLENAngleSweep runs) gives seconds per image.
--forward-ablation times only the transformer forward, interleaved: no LoRA, the LoRAs stacked into one
pair per layer (what the pack runs), and the same LoRAs through peft's own per-adapter loop.
--small builds a few-layer model to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import qwen_edit  # noqa: E402
from engines.fp8_linear import E4M3, Fp8Linear, convert_linears_to_fp8  # noqa: E402
from engines.lora_stack import LoraEntry, LoraStack  # noqa: E402

QWEN_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
QWEN_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, tokens_per_second=2)


class OffloadHost:
    """Only the requested modules on the GPU; the others go to the CPU (a 24 GB card's reality)."""

    def __init__(self, device: torch.device, modules: list[nn.Module]) -> None:
        self.device, self.modules, self.swap_s = device, modules, 0.0

    def prepare(self, *wanted: nn.Module, working_bytes: int = 0) -> torch.device:
        t = time.perf_counter()
        for m in self.modules:
            if all(m is not w for w in wanted):
                m.to("cpu")
        for m in wanted:
            m.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.swap_s += time.perf_counter() - t
        return self.device

    def check_interrupt(self) -> None:
        return None

    def measure(self, run) -> dict:
        """Runs ``run()`` timed from a synced GPU to a synced GPU, with the swap time and the peak counted
        afresh; returns seconds, swap_s and (on CUDA) peak_gib."""
        cuda = self.device.type == "cuda"
        self.swap_s = 0.0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        result = {"seconds": time.perf_counter() - t, "swap_s": round(self.swap_s, 2)}
        if cuda:
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        return result


def materialise(model: nn.Module, device: torch.device) -> int:
    """Random weights for every meta parameter, created on ``device`` in the parameter's dtype."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Fp8Linear) and mod.weight.device.type == "meta":
            w = torch.randn(mod.weight.shape, device=device, dtype=torch.bfloat16).to(E4M3)
            mod.weight = nn.Parameter(w, requires_grad=False)
            mod.weight_scale = torch.full((), 0.02, device=device)
            n += w.numel()
        for name, prm in list(mod._parameters.items()):
            if prm is None or prm.device.type != "meta":
                continue
            t = torch.empty(prm.shape, device=device, dtype=torch.bfloat16).normal_(0, 0.02)
            mod._parameters[name] = nn.Parameter(t.to(prm.dtype), requires_grad=False)
            n += prm.numel()
    return n


def build_pipeline(kit: Path, device: torch.device, precision: str, small: bool):
    from accelerate import init_empty_weights
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    bf = torch.bfloat16
    # A kit folder of its own, or the tiny-model kit's diffusers folder itself (its text_encoder/config.json).
    cfg_file = kit / "text_encoder_config.json"
    cfg = json.loads((cfg_file if cfg_file.is_file() else kit / "text_encoder" / "config.json").read_text())
    text, vision = dict(QWEN_7B_TEXT), dict(QWEN_7B_VISION)
    tcfg = dict(num_layers=60)
    if small:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={**text["rope_parameters"], "mrope_section": [2, 3, 3]})
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
        tcfg = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                    axes_dims_rope=(4, 6, 6))
    # layer_types is per layer: drop the kit's so the config derives it for the new depth.
    cfg["text_config"] = {k: v for k, v in {**cfg["text_config"], **text}.items() if k != "layer_types"}
    cfg["vision_config"] = {**cfg["vision_config"], **vision}
    cfg.pop("architectures", None)
    stats = {}

    t0 = time.perf_counter()
    with init_empty_weights(include_buffers=False):
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))
    text_encoder.to(bf)
    stats["text_encoder_b"] = round(materialise(text_encoder, device) / 1e9, 3)
    text_encoder.to(device).eval().to("cpu")

    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel(**tcfg)
    transformer.to(bf)
    if precision == "fp8":  # what engines.qwen_edit.load_qwen_edit does for fp8
        convert_linears_to_fp8(transformer, bf)
    stats["transformer_b"] = round(materialise(transformer, device) / 1e9, 3)
    transformer.to(device).eval()

    vae = AutoencoderKLQwenImage(**({} if not small else dict(base_dim=16)))
    vae.to(device, bf).eval()
    stats["build_s"] = round(time.perf_counter() - t0, 1)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(kit / "scheduler"), vae=vae,
        text_encoder=text_encoder, tokenizer=AutoTokenizer.from_pretrained(kit / "tokenizer"),
        processor=AutoProcessor.from_pretrained(kit / "processor"), transformer=transformer)
    return qwen_edit.QwenEditHandle(name="random-full-size", folder="-", precision=precision, pipe=pipe), stats


def write_loras(transformer: nn.Module, folder: Path, count: int, rank: int = 16) -> list[LoraEntry]:
    from safetensors.torch import save_file

    entries = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, mod in transformer.named_modules():
            if name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("attn.to_out.0"):
                tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.01
                tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.01
        path = folder / f"bench_lora_{i}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
        entries.append(LoraEntry(name=path.name, path=str(path), strength=0.8))
    return entries


def forward_ablation(handle, entries: list[LoraEntry], res: int, device: torch.device, rounds: int = 3,
                     forwards: int = 10) -> None:
    """Transformer forward alone (no encoder swaps), interleaved rounds of: no LoRA, the LoRAs stacked into
    one pair per layer (what FLENQwenEdit runs), and the same LoRAs through peft's per-adapter loop."""
    from engines.lora_adapters import unstack_adapters

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    transformer = handle.pipe.transformer.to(device)
    lat = res // 16
    n_img = lat * lat
    bf = torch.bfloat16
    inputs = dict(hidden_states=torch.randn(1, 2 * n_img, 64, device=device, dtype=bf),
                  encoder_hidden_states=torch.randn(1, 256, transformer.config.joint_attention_dim, device=device,
                                                    dtype=bf),
                  encoder_hidden_states_mask=torch.ones(1, 256, device=device, dtype=torch.long),
                  timestep=torch.full((1,), 0.5, device=device, dtype=bf),
                  img_shapes=[[(1, lat, lat), (1, lat, lat)]], return_dict=False)
    configs = {"none": LoraStack(), "stacked": LoraStack(tuple(entries)), "peft_loop": LoraStack(tuple(entries))}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for label, stack in configs.items():
            handle.adapters.apply(stack)
            if label == "peft_loop":
                unstack_adapters(transformer)
            with torch.no_grad():
                for i in range(forwards + 2):
                    if i == 2:
                        sync()
                        t = time.perf_counter()
                    transformer(**inputs)
                sync()
            times[label].append((time.perf_counter() - t) / forwards)
    base = min(times["none"])
    for label, ts in times.items():
        print(json.dumps(dict(impl="flenwheel-qwen-edit", bench="forward_ablation", res=res, loras=label,
                              n_loras=0 if label == "none" else len(entries), s_per_forward=round(min(ts), 4),
                              rounds=[round(x, 4) for x in ts], ratio_vs_none=round(min(ts) / base, 3),
                              gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kit", type=Path, required=True)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--cap", type=float, default=24.0)
    p.add_argument("--precision", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--loras", type=int, nargs="+", default=[0, 2])
    p.add_argument("--small", action="store_true")
    p.add_argument("--forward-ablation", action="store_true",
                   help="only time the transformer forward: no LoRA vs stacked vs peft's loop, interleaved")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap * 1024**3 / total))
    handle, stats = build_pipeline(a.kit, device, a.precision, a.small)
    pipe = handle.pipe
    host = OffloadHost(device, [pipe.text_encoder, pipe.transformer, pipe.vae])
    source = qwen_edit.Image.new("RGB", (a.res, a.res), (128, 100, 90))
    lora_dir = Path(tempfile.mkdtemp())
    entries = write_loras(pipe.transformer, lora_dir, max(a.loras))
    if a.forward_ablation:
        forward_ablation(handle, entries[:max(a.loras)], a.res, device)
        return 0
    common = dict(impl="flenwheel-qwen-edit", precision=a.precision, res=a.res, cap_gb=a.cap,
                  gpu=torch.cuda.get_device_name(0) if cuda else "cpu", **stats)

    for n_loras in a.loras:
        stack = LoraStack(tuple(entries[:n_loras]))
        warm = qwen_edit.EditRequest(instruction="将镜头向左旋转45度", steps=2, width=a.res, height=a.res)
        qwen_edit.edit(handle, [source], warm, stack, host)
        for steps, cfg in ((8, 1.0), (40, 4.0)):
            step_times: list[float] = []

            def on_step(_i, _n, _lat, _t=step_times):
                if cuda:
                    torch.cuda.synchronize()
                _t.append(time.perf_counter())

            req = qwen_edit.EditRequest(instruction="将镜头向左旋转45度", negative_prompt=" ", steps=steps,
                                        true_cfg=cfg, width=a.res, height=a.res)
            m = host.measure(partial(qwen_edit.edit, handle, [source], req, stack, host, on_step=on_step))
            per_step = (step_times[-1] - step_times[0]) / max(1, len(step_times) - 1)
            row = dict(common, loras=n_loras, steps=steps, true_cfg=cfg, s_per_image=round(m.pop("seconds"), 2),
                       s_per_step=round(per_step, 3), s_per_forward=round(per_step / (2 if cfg > 1 else 1), 3), **m)
            print(json.dumps(row), flush=True)
        # An angle sweep (FLENAngleSweep): 5 instructions, encoded together, then denoised together.
        jobs = [qwen_edit.EditJob([source], qwen_edit.EditRequest(instruction=f"将镜头向左旋转{15 * k}度", steps=8,
                                                                  seed=k, width=a.res, height=a.res))
                for k in range(5)]
        m = host.measure(partial(qwen_edit.edit_many, handle, jobs, stack, host))
        row = dict(common, loras=n_loras, steps=8, true_cfg=1.0, sweep=len(jobs),
                   s_per_image=round(m.pop("seconds") / len(jobs), 2), **m)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
