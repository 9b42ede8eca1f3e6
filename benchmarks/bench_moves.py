"""GPU benchmark: model moves inside ComfyUI's VRAM manager — ComfyUI's plain ModelPatcher against the bridge's
ResidentPatcher (host copy kept, pinned; offload drops the GPU copy), interleaved in one run.

    COMFYUI_PATH=... python benchmarks/bench_moves.py --kit KIT_DIR [--models qwen flux] [--cap 24] [--rounds 2]

KIT_DIR: the tiny-model kit's diffusers folder for Qwen (tokenizer/processor/scheduler; see bench_qwen_edit.py)
and for FLUX (bench_flux_generate.py), e.g. ``--kit DIR/diffusers`` holding flen-tiny-qwen-image-edit and
flen-tiny-flux. Random full-size weights (Qwen-Image-Edit-2509 fp8 transformer + bf16 Qwen2.5-VL-7B; FLUX.1-dev
fp8 + bf16 T5-XXL + CLIP-L), no download. ComfyUI is imported in-process on CUDA and told the card has ``--cap``
GiB (its own EXTRA_RESERVED_VRAM, as ``--reserve-vram`` does; the process is capped to the same): the text
encoder and the transformer do not fit together, so every image makes ComfyUI unload one for the other — through
``load_models_gpu``, the path the nodes use (bridge.ComfyModelHost). Per image: seconds, seconds inside
``prepare`` (the moves), peak GiB. The first image of each mode (pinning the host copies) is reported apart.
``--small`` checks the script on a few-layer model, also on a CPU (where nothing moves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _import_comfy(cap_gib: float):
    comfy_path = os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy" / "ComfyUI"))
    sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import torch
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()  # (the --small check on a CPU: nothing moves there)
    import comfy.model_management as mm

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        cap = int(cap_gib * 1024**3)
        mm.EXTRA_RESERVED_VRAM = max(0, total - cap)  # what --reserve-vram sets: ComfyUI plans for a `cap` card
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    # the pack as ComfyUI imports it (a package under custom_nodes): a link named like a package
    parent = tempfile.mkdtemp()
    os.symlink(REPO, os.path.join(parent, "flen_pack"))
    sys.path.insert(0, parent)
    from flen_pack.nodes import comfy_bridge

    return mm, comfy_bridge


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kit", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["qwen", "flux"], choices=["qwen", "flux"])
    p.add_argument("--cap", type=float, default=24.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--small", action="store_true")
    p.add_argument("--wait-times", action="store_true",
                   help="instead of the comparison: what a user waits for, resident weights only — a 15-photo x "
                        "5-angle sweep (Qwen, 8 steps) and the 18-cell model card (FLUX, 28 steps)")
    p.add_argument("--photos", type=int, default=15)
    a = p.parse_args()

    import torch

    mm, bridge = _import_comfy(a.cap)
    from benchmarks import bench_flux_generate, bench_qwen_edit
    from engines import flux_pipeline, qwen_edit
    from engines.lora_stack import LoraStack
    # the bridge's copy of the module (the pack is imported as a package): its instances are the ones counted
    pinned_bytes = sys.modules[bridge.ResidentWeights.__module__].pinned_bytes

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class TimedHost(bridge.ComfyModelHost):
        moves_s = 0.0

        def prepare(self, *modules, working_bytes=0):
            sync()
            t = time.perf_counter()
            out = super().prepare(*modules, working_bytes=working_bytes)
            sync()
            TimedHost.moves_s += time.perf_counter() - t
            return out

    outputs: dict[str, torch.Tensor] = {}
    repeat_diff: dict[str, float] = {}

    def run_image(fn, mode: str) -> dict:
        TimedHost.moves_s = 0.0
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        images, _meta = fn()
        sync()
        image = images.float().cpu()
        outputs.setdefault(mode, image)  # same seed every image: the modes must agree
        repeat_diff[mode] = float((image - outputs[mode]).abs().max())  # GPU run-to-run noise, for scale
        peak = round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else None
        return dict(s_per_image=round(time.perf_counter() - t, 2), moves_s=round(TimedHost.moves_s, 2),
                    peak_gib=peak)

    def fresh_patchers(modules, resident: bool) -> None:
        mm.unload_all_models()
        for m in modules:
            bridge.release(m)
        os.environ["FLENWHEEL_RESIDENT_WEIGHTS"] = "1" if resident else "0"
        for m in modules:
            m.to("cpu")  # a pageable host copy, as a loader leaves it
        mm.soft_empty_cache()

    lora_stacks: dict[int, LoraStack] = {}

    def loras(transformer) -> LoraStack:
        """Two rank-16 LoRAs, stacked while the transformer is offloaded: the pair buffers are made on the host
        and must travel with the resident copy (state that the host copy does not hold yet)."""
        if id(transformer) not in lora_stacks:
            entries = bench_qwen_edit.write_loras(transformer, Path(tempfile.mkdtemp()), 2)
            lora_stacks[id(transformer)] = LoraStack(tuple(entries))
        return lora_stacks[id(transformer)]

    def qwen_job(sweep_photos: int = 0):
        handle, stats = bench_qwen_edit.build_pipeline(a.kit / "flen-tiny-qwen-image-edit", device, "fp8", a.small)
        pipe = handle.pipe
        source = qwen_edit.Image.new("RGB", (a.res, a.res), (128, 100, 90))
        req = qwen_edit.EditRequest(instruction="将镜头向左旋转45度", negative_prompt=" ", steps=8, true_cfg=1.0,
                                    width=a.res, height=a.res)  # the Lightning set-up
        modules = [pipe.text_encoder, pipe.transformer, pipe.vae]
        if sweep_photos:
            # what FLENAngleSweep runs for a batch of photos: every (photo, angle) one job, encoded then denoised
            photos = [qwen_edit.Image.new("RGB", (a.res, a.res), (120 + 7 * i, 100, 90)) for i in range(sweep_photos)]
            jobs = [qwen_edit.EditJob([photo], qwen_edit.EditRequest(instruction=line, steps=8, seed=i * 5 + j,
                                                                     width=a.res, height=a.res))
                    for i, photo in enumerate(photos) for j, line in enumerate(SWEEP_LINES)]
            return (f"qwen-sweep-{sweep_photos}x{len(SWEEP_LINES)}-8-steps", modules, stats,
                    lambda: qwen_edit.edit_many(handle, jobs, loras(pipe.transformer), TimedHost()))
        return ("qwen-edit-8-steps", modules, stats,
                lambda: qwen_edit.edit(handle, [source], req, loras(pipe.transformer), TimedHost()))

    def flux_job(card: bool = False):
        handle, stats = bench_flux_generate.build(a.kit / "flen-tiny-flux", device, a.small)
        pipe = handle.pipe
        req = flux_pipeline.FluxRequest(prompts=("a photo of ohwx_char person, neutral expression",),
                                        width=a.res, height=a.res, steps=28, guidance=3.5)
        modules = [pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae]
        if card:
            from engines import model_card

            cells = model_card.parse_prompt_set(model_card.DEFAULT_PROMPT_SET)
            settings = model_card.CardSettings(width=a.res, height=a.res, steps=28)
            return (f"flux-model-card-{len(cells)}-cells-28-steps", modules, stats,
                    lambda: model_card.render_cells(handle, cells, settings, loras(pipe.transformer), TimedHost()))
        return ("flux-28-steps", modules, stats,
                lambda: flux_pipeline.generate(handle, req, loras(pipe.transformer), TimedHost()))

    if a.wait_times:
        return wait_times(a, qwen_job, flux_job, fresh_patchers, run_image, pinned_bytes, gpu)

    # one model family in memory at a time: both at full size would need ~60 GB of host RAM
    for build in [{"qwen": qwen_job, "flux": flux_job}[m] for m in a.models]:
        label, modules, stats, fn = build()
        host_gib = round(sum(t.numel() * t.element_size() for m in modules
                             for t in list(m.parameters()) + list(m.buffers())) / 1024**3, 2)
        results: dict[str, list[dict]] = {"modelpatcher": [], "resident": []}
        for rnd in range(a.rounds):
            for mode in ("modelpatcher", "resident"):
                fresh_patchers(modules, mode == "resident")
                first = run_image(fn, mode)  # loads from pageable memory (resident: pins the host copy on the way)
                steady = [run_image(fn, mode) for _ in range(2)]
                row = dict(bench="moves", job=label, mode=mode, round=rnd, cap_gib=a.cap, gpu=gpu,
                           host_copy_gib=host_gib, pinned_gib=round(pinned_bytes() / 1024**3, 2),
                           first_image=first, **steady[-1], **stats)
                results[mode].append(row)
                print(json.dumps(row), flush=True)
        best = {m: min(r["s_per_image"] for r in rows) for m, rows in results.items()}
        moves = {m: min(r["moves_s"] for r in rows) for m, rows in results.items()}
        diff = float((outputs["modelpatcher"] - outputs["resident"]).abs().max())
        outputs.clear()
        print(json.dumps(dict(bench="moves_summary", job=label, cap_gib=a.cap, gpu=gpu, loras=2,
                              max_abs_diff_resident_vs_modelpatcher=diff,
                              max_abs_diff_same_mode_repeat=dict(repeat_diff), s_per_image=best, moves_s=moves,
                              speedup_vs_modelpatcher=round(best["modelpatcher"] / best["resident"], 2),
                              moves_speedup=round(moves["modelpatcher"] / max(moves["resident"], 1e-3), 2))),
              flush=True)
        fresh_patchers(modules, True)
        for m in modules:
            bridge.release(m)
        del modules, fn
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


# the Multiple-angles LoRA's own training phrases (engines/angle_catalogue.py marks them)
SWEEP_LINES = ("将镜头向左旋转45度", "将镜头向右旋转45度", "将镜头向左旋转90度", "将镜头转为俯视", "将镜头转为特写镜头")


def wait_times(a, qwen_job, flux_job, fresh_patchers, run_image, pinned_bytes, gpu: str) -> int:
    """Whole jobs as a user runs them, through ComfyUI's VRAM manager with the resident weights, once each from a
    fresh start (the host copies pinned on the way, as in a user's first job). One model family at a time."""
    import gc

    import torch

    jobs = []
    if "qwen" in a.models:
        jobs.append(lambda: qwen_job(a.photos))
    if "flux" in a.models:
        jobs.append(lambda: flux_job(card=True))
    for build in jobs:
        label, modules, stats, fn = build()
        fresh_patchers(modules, True)
        first = run_image(fn, label)  # a fresh ComfyUI: includes pinning the host copies once
        print(json.dumps(dict(bench="wait_times", job=label, cap_gib=a.cap, gpu=gpu, loras=2, res=a.res,
                              pinned_gib=round(pinned_bytes() / 1024**3, 2), **first, **stats)), flush=True)
        fresh_patchers(modules, True)
        del modules, fn
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
