"""GPU benchmark: the pack's fp8 transformer forward against ComfyUI's native fp8 forward, with a kernel profile
of both, on random full-size weights.

    python benchmarks/bench_fp8_forward.py --model flux|qwen [--res 1024] [--comfy COMFYUI_DIR] [--rounds 3]

Ours: the diffusers transformer with the pack's fp8 layers (engines/fp8_linear.py), built as the loaders build
it, in configurations timed in interleaved rounds of 10 forwards: ``before`` (diffusers' RMSNorm and attention
processor, each fp8 projection casting its own input), ``fused_norms`` (engines/fused_ops.py's RMSNorm: Qwen),
``shared_casts`` (+ the sibling projections sharing one e4m3 cast), ``pack`` (+ FLUX's rotary embedding as one
complex product: what the pack runs, engines/fused_ops.prepare_for_inference). Then, with ``--comfy``,
ComfyUI's own model (comfy.ldm) with ``comfy.ops.fp8_ops`` (fp8 matmul) and ``manual_cast`` (fp8 weights cast
to bf16), built and timed in this process the way ``../shared/bench/native_forward.py`` does.
Inputs as the peers use them: FLUX 1024² (4096 image tokens) + 512 text tokens;
Qwen 1024² + a 1024² reference + 256 text tokens, no text mask
(the pack's pipeline drops the all-ones mask). One profiled forward per configuration prints its top kernels.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_qwen_edit import materialise  # noqa: E402
from engines.fp8_linear import E4M3, Fp8Linear, convert_linears_to_fp8, share_sibling_casts  # noqa: E402
from engines.fused_ops import fuse_rms_norms, use_flux_rope_processor  # noqa: E402

BF = torch.bfloat16


def build_ours(model: str, device: torch.device) -> tuple[nn.Module, dict]:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    with init_empty_weights(include_buffers=False):
        m = FluxTransformer2DModel(guidance_embeds=True) if model == "flux" else QwenImageTransformer2DModel(
            num_layers=60)
    m.to(BF)
    convert_linears_to_fp8(m, BF)
    materialise(m, device)
    m.to(device).eval().requires_grad_(False)
    res = int(RES)
    lat = res // 16
    g = torch.Generator(device=device).manual_seed(0)
    if model == "flux":
        n = lat * lat
        ids = torch.zeros(n, 3, device=device)
        ids[:, 1] = torch.arange(lat, device=device).repeat_interleave(lat)
        ids[:, 2] = torch.arange(lat, device=device).repeat(lat)
        inputs = dict(hidden_states=torch.randn(1, n, 64, device=device, dtype=BF, generator=g),
                      encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=BF, generator=g),
                      pooled_projections=torch.randn(1, 768, device=device, dtype=BF, generator=g),
                      timestep=torch.full((1,), 0.5, device=device, dtype=BF), img_ids=ids,
                      txt_ids=torch.zeros(512, 3, device=device), guidance=torch.full((1,), 3.5, device=device),
                      return_dict=False)
    else:
        n = lat * lat
        inputs = dict(hidden_states=torch.randn(1, 2 * n, 64, device=device, dtype=BF, generator=g),
                      encoder_hidden_states=torch.randn(1, 256, m.config.joint_attention_dim, device=device,
                                                        dtype=BF, generator=g),
                      encoder_hidden_states_mask=None, timestep=torch.full((1,), 0.5, device=device, dtype=BF),
                      img_shapes=[[(1, lat, lat), (1, lat, lat)]], return_dict=False)
    return m, inputs


def build_native(model: str, comfy: Path, ops_name: str, device: torch.device) -> tuple[nn.Module, Callable]:
    sys.path.insert(0, str(comfy))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.ops

    ops = {"manual": comfy.ops.manual_cast, "fp8mm": comfy.ops.fp8_ops}[ops_name]
    if model == "qwen":
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel as M
        cfg: dict = dict(image_model="qwen_image")
        ctx_len, ctx_dim = 256, 3584
    else:
        from comfy.ldm.flux.model import Flux as M
        cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                   axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)
        ctx_len, ctx_dim = 512, 4096
    with torch.device("meta"):
        m = M(**cfg, dtype=BF, device="meta", operations=ops)
    for mod in m.modules():
        for name, prm in list(mod._parameters.items()):
            if prm is None:
                continue
            t = torch.randn(prm.shape, device=device, dtype=BF) * 0.02
            if isinstance(mod, nn.Linear) and name == "weight":
                t = t.to(E4M3)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.zeros(b.shape, device=device, dtype=b.dtype)
    m.eval()
    lat = int(RES) // 8
    x = torch.randn(*((1, 16, 1, lat, lat) if model == "qwen" else (1, 16, lat, lat)), device=device, dtype=BF)
    ctx = torch.randn(1, ctx_len, ctx_dim, device=device, dtype=BF)
    t = torch.tensor([0.5], device=device, dtype=BF)
    ref = torch.randn_like(x)
    y = torch.randn(1, 768, device=device, dtype=BF)
    guidance = torch.full((1,), 3.5, device=device, dtype=BF)

    def fwd():
        if model == "qwen":
            return m(x, t, ctx, ref_latents=[ref])
        return m(x, t, ctx, y=y, guidance=guidance)

    return m, fwd


def timed(fn: Callable, forwards: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(forwards):
            fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / forwards


def profile(fn: Callable, label: str, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type.name == "CUDA":
            entry = per_kernel[evt.name[:90]]
            entry[0] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            entry[1] += 1
    total = sum(v[0] for v in per_kernel.values())
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    print(json.dumps(dict(bench="profile", config=label, model=MODEL, kernel_ms_total=round(total / 1e3, 2),
                          top=[dict(kernel=k, ms=round(v[0] / 1e3, 2), calls=v[1]) for k, v in rows])), flush=True)


def copy_sources(fn: Callable, label: str, top: int = 12) -> None:
    """Where the copy and cast kernels come from: CUDA time of the aten copy/cat ops grouped by call stack."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                           record_shapes=True) as prof:
            fn()
            torch.cuda.synchronize()
    rows = []
    for avg in prof.key_averages(group_by_stack_n=6, group_by_input_shape=True):
        if avg.key in ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::reshape", "aten::to"):
            ms = getattr(avg, "device_time_total", 0) / 1e3
            rows.append(dict(op=avg.key, ms=round(ms, 2), calls=avg.count, shapes=str(avg.input_shapes)[:160],
                             stack=[f for f in avg.stack if "site-packages/torch" not in f][:4]))
    rows.sort(key=lambda r: -r["ms"])
    print(json.dumps(dict(bench="copy_sources", config=label, model=MODEL, top=rows[:top])), flush=True)


def main() -> int:
    global RES, MODEL
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["flux", "qwen"], required=True)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--comfy", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--forwards", type=int, default=10)
    p.add_argument("--stacks", action="store_true", help="also print where the copy kernels come from")
    a = p.parse_args()
    RES, MODEL = a.res, a.model
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    run_ours(a, device, gpu)
    gc.collect()
    torch.cuda.empty_cache()
    if a.comfy:
        run_native(a, device, gpu)
    return 0


def run_ours(a: argparse.Namespace, device: torch.device, gpu: str) -> None:
    m, inputs = build_ours(a.model, device)
    from diffusers.models.normalization import RMSNorm

    originals = {name: mod for name, mod in m.named_modules() if type(mod) is RMSNorm}
    fuse_rms_norms(m)
    fused = {name: m.get_submodule(name) for name in originals}
    share_sibling_casts(m)
    links = {id(mod): mod.shared_cast for mod in m.modules() if isinstance(mod, Fp8Linear)}
    attns = [mod for mod in m.modules() if hasattr(mod, "processor") and hasattr(mod, "set_processor")]
    plain = {id(mod): mod.processor for mod in attns}
    use_flux_rope_processor(m)
    rope = {id(mod): mod.processor for mod in attns}

    def configure(norms: str, shared: bool, processor: str = "diffusers") -> None:
        for mod in attns:
            mod.set_processor((plain if processor == "diffusers" else rope)[id(mod)])
        for name in originals:
            parent_name, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, child,
                    (originals if norms == "diffusers" else fused)[name])
        for mod in m.modules():
            if isinstance(mod, Fp8Linear):
                mod.shared_cast = links[id(mod)] if shared else None

    configs = {"before": ("diffusers", False, "diffusers"), "fused_norms": ("fused", False, "diffusers"),
               "shared_casts": ("fused", True, "diffusers"), "pack": ("fused", True, "pack")}

    def fwd():
        return m(**inputs)

    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(a.rounds):
        for label, config in configs.items():
            configure(*config)
            times[label].append(timed(fwd, a.forwards))
    for label, ts in times.items():
        print(json.dumps(dict(impl="flenwheel", bench="fp8_forward", model=a.model, res=a.res, config=label,
                              s_per_forward=round(min(ts), 4), rounds=[round(x, 4) for x in ts],
                              n_rms_norms=len(originals), gpu=gpu)), flush=True)
    for label in ("before", "pack"):
        configure(*configs[label])
        profile(fwd, f"flenwheel-{label}")
    if a.stacks:
        copy_sources(fwd, "flenwheel-pack")
    peak = torch.cuda.max_memory_allocated() / 1024**3
    print(json.dumps(dict(impl="flenwheel", bench="fp8_forward_peak", model=a.model, peak_gib=round(peak, 2))))


def run_native(a: argparse.Namespace, device: torch.device, gpu: str) -> None:
    for ops_name in ("fp8mm", "manual"):
        nm, nfwd = build_native(a.model, a.comfy, ops_name, device)
        ts = [timed(nfwd, a.forwards) for _ in range(a.rounds)]
        print(json.dumps(dict(impl="comfy-native", bench="fp8_forward", model=a.model, res=a.res, ops=ops_name,
                              s_per_forward=round(min(ts), 4), rounds=[round(x, 4) for x in ts], gpu=gpu)),
              flush=True)
        if ops_name == "fp8mm":
            profile(nfwd, "comfy-fp8mm")
            if a.stacks:
                copy_sources(nfwd, "comfy-fp8mm")
        del nm, nfwd
        gc.collect()
        torch.cuda.empty_cache()


RES = 1024
MODEL = "flux"

if __name__ == "__main__":
    raise SystemExit(main())
