"""GPU benchmark: FLENwheel's FLUX.1-dev generation (engines/flux_pipeline.py) and the 18-cell model card on
random full-size weights.

    python benchmarks/bench_flux_generate.py --kit KIT_DIR [--res 1024] [--steps 28] [--cap 24] [--loras 2]
                                              [--small]

KIT_DIR holds tokenizer/, tokenizer_2/ and scheduler/ (the tiny-model kit's are fine: token ids are all that
reaches the models). Transformer (11.9 B, FLUX.1-dev layout, fp8 precision as the loader does it), CLIP-L,
T5-XXL encoder (4.8 B) and VAE are built at full size with random weights. The memory cap plays a 24 GB card;
the host keeps only the running stage's modules on the GPU. Prints one JSON line per configuration.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_qwen_edit import OffloadHost, materialise, write_loras  # noqa: E402
from engines import flux_pipeline, model_card  # noqa: E402
from engines.fp8_linear import convert_linears_to_fp8  # noqa: E402
from engines.lora_stack import LoraStack  # noqa: E402


def build(kit: Path, device: torch.device, small: bool) -> tuple[flux_pipeline.FluxHandle, dict]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    bf = torch.bfloat16
    tcfg = dict(guidance_embeds=True)
    t5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    clip = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                vocab_size=49408, max_position_embeddings=77, projection_dim=768)
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False)
    if small:
        tcfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        t5.update(d_model=64, d_ff=128, num_heads=2, num_layers=2)
        clip.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
        vae_cfg.update(block_out_channels=[16, 16, 16, 16], norm_num_groups=8)
    stats = {}
    t0 = time.perf_counter()
    with init_empty_weights(include_buffers=False):
        text_encoder_2 = T5EncoderModel(T5Config(**t5))
        transformer = FluxTransformer2DModel(**tcfg)
    text_encoder_2.to(bf)
    stats["t5_b"] = round(materialise(text_encoder_2, device) / 1e9, 3)
    text_encoder_2.to(device).eval().to("cpu")
    transformer.to(bf)
    convert_linears_to_fp8(transformer, bf)  # precision "fp8", as engines.flux_pipeline.load_flux does
    stats["transformer_b"] = round(materialise(transformer, device) / 1e9, 3)
    transformer.to(device).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip)).to(device, bf).eval()
    vae = AutoencoderKL(**vae_cfg).to(device, bf).eval()
    stats["build_s"] = round(time.perf_counter() - t0, 1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(kit / "scheduler"), vae=vae,
                        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(kit / "tokenizer"),
                        text_encoder_2=text_encoder_2, tokenizer_2=T5TokenizerFast.from_pretrained(kit / "tokenizer_2"),
                        transformer=transformer)
    return flux_pipeline.FluxHandle(name="random-full-size", folder="-", precision="fp8", pipe=pipe), stats


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kit", type=Path, required=True)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cap", type=float, default=24.0)
    p.add_argument("--loras", type=int, default=1, help="LoRAs in the stack (rank 16, stacked into one pair)")
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, a.cap * 1024**3 / torch.cuda.get_device_properties(0).total_memory))
    handle, stats = build(a.kit, device, a.small)
    pipe = handle.pipe
    host = OffloadHost(device, [pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae])
    loras = LoraStack(tuple(write_loras(pipe.transformer, Path(tempfile.mkdtemp()), a.loras)))
    common = dict(impl="flenwheel-flux", precision="fp8", res=a.res, steps=a.steps, cap_gb=a.cap,
                  gpu=torch.cuda.get_device_name(0) if cuda else "cpu", **stats)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    req = flux_pipeline.FluxRequest(prompts=("a photo of ohwx_char person, neutral expression",),
                                    width=a.res, height=a.res, steps=a.steps, guidance=3.5)
    with_loras = f"{a.loras}_loras"
    for name, stack in (("none", LoraStack()), (with_loras, loras)):
        flux_pipeline.generate(handle, flux_pipeline.FluxRequest(prompts=("warm-up",), width=a.res, height=a.res,
                                                                 steps=2), stack, host)
        stamps: list[float] = []

        def on_step(_i, _n, _lat, _s=stamps):
            sync()
            _s.append(time.perf_counter())

        m = host.measure(partial(flux_pipeline.generate, handle, req, stack, host, on_step=on_step))
        row = dict(common, lora=name, s_per_image=round(m.pop("seconds"), 2),
                   s_per_forward=round((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), 3), **m)
        print(json.dumps(row), flush=True)

    cells = model_card.parse_prompt_set(model_card.DEFAULT_PROMPT_SET)
    settings = model_card.CardSettings(width=a.res, height=a.res, steps=a.steps)
    m = host.measure(partial(model_card.render_cells, handle, cells, settings, loras, host))
    row = dict(common, lora=with_loras, model_card_cells=len(cells), model_card_render_s=round(m.pop("seconds"), 1),
               **m)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
