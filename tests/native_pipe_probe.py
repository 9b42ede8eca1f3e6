"""Run in a subprocess (ComfyUI on sys.path): the pack's nodes on ComfyUI's own MODEL / CLIP / VAE.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR flux|qwen. Prints one line ``RESULT <json>``.

ComfyUI 0.3.64's loaders (UNETLoader, DualCLIPLoader, CLIPLoader, VAELoader) cannot load the tiny kit's files: their
detectors and model classes hard-code the full models' widths. So this builds the very objects those loaders return
(``comfy.model_patcher.ModelPatcher`` around ComfyUI's model class, ``comfy.sd.CLIP``, ``comfy.sd.VAE``) from the kit's
split files, through ComfyUI's own code, with only these taken from the tiny files instead of ComfyUI's constants:

* MODEL: the widths ComfyUI's detector hard-codes (as tests/comfy_layout_probe.py), and the latent format's channel
  count, scale and shift (ComfyUI's FLUX / Wan 2.1 latent formats are the real VAEs' 16 channels and constants;
  the tiny VAEs have 1 and 4 channels and their own constants).
* VAE: ``comfy.sd.VAE`` detects the file as usual, but the encoder/decoder classes it instantiates get the tiny
  widths (FLUX ae: 4 channels, one level, one residual block, GroupNorm of 1 group; Wan VAE: base dim 8, 4 latent
  channels) and the VAE's compression ratio (FLUX tiny: 1) is set to the tiny one.
* CLIP: ComfyUI's own ``FluxClipModel`` / ``FluxTokenizer`` encode path with ComfyUI's CLIP and T5 classes built from
  the tiny files' configs (ComfyUI reads these from its bundled JSON for the real models), CLIP's vocabulary size
  (hard-coded 49408 in ComfyUI, 600 in the tiny CLIP), T5's relative-attention bucket count (hard-coded 32, 8 in the
  tiny T5), and ComfyUI's SDTokenizer over the tiny files' own
  tokenizers (ComfyUI's bundled ones are the real vocabularies). T5 is padded to 512 tokens as the pack's diffusers
  path pads (ComfyUI's own FLUX tokenizer pads to 256), so the two paths see the same text conditioning.
* Qwen CLIP: ComfyUI's own ``QwenImageTEModel`` / ``QwenImageTokenizer`` (the classes CLIPLoader type qwen_image
  builds) with the tiny widths in place of ComfyUI's constants: the text model's config fields, ``head_dim`` and
  ``rope_dims`` (class attributes of ComfyUI's Qwen2.5-VL config, 128 and [16, 24, 24]), the vision tower's width,
  depth, heads and full-attention blocks (hard-coded 1280 wide, 32 deep). ComfyUI finds Qwen2.5-VL's special tokens
  by the real vocabulary's ids (151643…151656): the tiny tokenizer's ids for them are mapped onto those, and the tiny
  embedding rows for them are copied to those rows of a real-size (152064) embedding table.
"""

import json
import sys
import types
from contextlib import contextmanager

comfy_path, pack_parent, models_dir, which = sys.argv[1:5]
sys.path[:0] = [comfy_path, pack_parent]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import folder_paths  # noqa: E402

folder_paths.add_model_folder_path("loras", f"{models_dir}/loras", is_default=True)
import comfy.latent_formats  # noqa: E402
import comfy.ldm.modules.diffusionmodules.model as ldm_model  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from FLENwheel.engines import flux_pipeline  # noqa: E402
from FLENwheel.engines import split_files as sf  # noqa: E402
from FLENwheel.engines.errors import FlenUserError  # noqa: E402
from FLENwheel.engines.lora_stack import LoraEntry, LoraStack  # noqa: E402
from FLENwheel.engines.model_host import LocalHost  # noqa: E402
from FLENwheel.nodes.flux_nodes import FLENFluxFromComfy, FLENFluxGenerate  # noqa: E402
from FLENwheel.nodes.training_nodes import FLENTrainCharacterLoRA, _base_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

CPU = torch.device("cpu")
DM, TE, VAE = (f"{models_dir}/{d}/flen-tiny" for d in ("diffusion_models", "text_encoders", "vae"))


def meta_config(path: str, component: str) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["flen_config"])[component]


@contextmanager
def replaced(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def native_model(path: str, latent_format) -> comfy.model_patcher.ModelPatcher:
    sd = comfy.utils.load_torch_file(path)
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    cfg = meta_config(path, "transformer")
    uc = model_config.unet_config
    if uc["image_model"] == "flux":
        uc.update(hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                  num_heads=cfg["num_attention_heads"], context_in_dim=cfg["joint_attention_dim"],
                  axes_dim=cfg["axes_dims_rope"], out_channels=uc["in_channels"])
    else:
        uc.update({k: cfg[k] for k in ("patch_size", "out_channels", "attention_head_dim", "num_attention_heads",
                                       "joint_attention_dim", "axes_dims_rope")})
    model_config.latent_format = latent_format
    model_config.set_inference_dtype(torch.float32, torch.float32)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


# ---- FLUX -----------------------------------------------------------------------------------------------------------

def flux_vae(path: str) -> comfy.sd.VAE:
    vcfg = meta_config(path, "vae")
    widths = {"ch": vcfg["block_out_channels"][0], "num_res_blocks": vcfg["layers_per_block"],
              "ch_mult": [c // vcfg["block_out_channels"][0] for c in vcfg["block_out_channels"]]}

    def tiny(cls):
        class Tiny(cls):
            def __init__(self, **kw):
                super().__init__(**{**kw, **widths})
        return Tiny

    groups = vcfg["norm_num_groups"]

    class TinyOps(ldm_model.ops):  # ComfyUI's Normalize hard-codes 32 groups
        class GroupNorm(ldm_model.ops.GroupNorm):
            def __init__(self, num_groups, num_channels, *a, **kw):
                super().__init__(groups, num_channels, *a, **kw)

    with replaced(ldm_model, "Encoder", tiny(ldm_model.Encoder)), \
            replaced(ldm_model, "Decoder", tiny(ldm_model.Decoder)), replaced(ldm_model, "ops", TinyOps):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(vcfg["block_out_channels"]) - 1)
    vae.first_stage_model.load_state_dict(comfy.utils.load_torch_file(path), strict=True)  # every weight, every shape
    return vae


def flux_clip(clip_path: str, t5_path: str) -> comfy.sd.CLIP:
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_cfg = meta_config(clip_path, "text_encoder")
    t5_cfg = meta_config(t5_path, "text_encoder_2")
    clip_tok = sf.tokenizer_folder(sf.inspect_file(clip_path), None, "CLIP")
    t5_tok = sf.tokenizer_folder(sf.inspect_file(t5_path), None, "T5")
    buckets = t5_cfg["relative_attention_num_buckets"]

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            model_options = model_options or {}
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=clip_cfg, return_projected_pooled=False,
                special_tokens={"start": clip_cfg["bos_token_id"], "end": clip_cfg["eos_token_id"],
                                "pad": clip_cfg["pad_token_id"]}, model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=t5_cfg, model_class=comfy.text_encoders.t5.T5,
                special_tokens={"end": t5_cfg["eos_token_id"], "pad": t5_cfg["pad_token_id"]},
                enable_attention_masks=False, return_attention_masks=False, model_options=model_options)
            emb = self.clip_l.transformer.text_model.embeddings
            emb.token_embedding = type(emb.token_embedding)(clip_cfg["vocab_size"], clip_cfg["hidden_size"])
            for m in self.t5xxl.modules():
                if getattr(m, "relative_attention_bias", None) is not None:
                    m.relative_attention_num_buckets = buckets
                    m.relative_attention_bias = type(m.relative_attention_bias)(buckets, m.num_heads)
            self.dtypes = {dtype}

    class TinyFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            tokenizer_data = tokenizer_data or {}
            self.clip_l = comfy.sd1_clip.SDTokenizer(clip_tok, embedding_size=clip_cfg["hidden_size"],
                                                     tokenizer_class=CLIPTokenizer, tokenizer_data=tokenizer_data)
            self.t5xxl = comfy.sd1_clip.SDTokenizer(
                t5_tok, pad_with_end=False, embedding_size=t5_cfg["d_model"], embedding_key="t5xxl",
                tokenizer_class=T5TokenizerFast, has_start_token=False, pad_to_max_length=False, max_length=99999999,
                min_length=512, pad_token=t5_cfg["pad_token_id"], tokenizer_data=tokenizer_data)

    target = types.SimpleNamespace(clip=TinyFluxClip, tokenizer=TinyFluxTokenizer, params={})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    for path in (clip_path, t5_path):
        missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(path))
        # the tiny CLIP-L has no projection; FLUX uses only its pooled output
        assert not unexpected and all("text_projection" in k for k in missing), (missing, unexpected)
    return clip


def run_flux() -> dict:
    ae = f"{VAE}/ae_tiny.safetensors"
    vcfg = meta_config(ae, "vae")

    class TinyFluxLatent(comfy.latent_formats.Flux):
        latent_channels = vcfg["latent_channels"]

        def __init__(self):
            self.scale_factor, self.shift_factor = vcfg["scaling_factor"], vcfg["shift_factor"]

    dm = f"{DM}/flux1-dev-tiny.safetensors"
    model = native_model(dm, TinyFluxLatent())
    clip = flux_clip(f"{TE}/clip_l_tiny.safetensors", f"{TE}/t5xxl_tiny_bf16.safetensors")
    vae = flux_vae(ae)
    schedule = meta_config(dm, "scheduler")  # the tiny pipeline's own scheduler, as the split-file path uses it
    out: dict = {"schedule": schedule}

    (pipe,) = FLENFluxFromComfy.execute(model, clip, vae, "tiny-native").args
    pipe.schedule = dict(schedule)
    lora_a = f"{models_dir}/loras/flen-tiny/flux_lora_a.safetensors"

    def stack(strength=None):
        if strength is None:
            return LoraStack()
        return LoraStack((LoraEntry("flen-tiny/flux_lora_a.safetensors", lora_a, strength),))

    def gen(seed, lora=None, steps=3):
        images, metas = FLENFluxGenerate.execute(pipe, "a photo of a person\na red car", 32, 32, steps, 3.5, seed,
                                                 1, stack(lora)).args
        return images, metas

    progress: list = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total, preview is not None)))
    a, metas = gen(5)
    comfy.utils.set_progress_bar_global_hook(None)
    b, _ = gen(5)
    c, _ = gen(6)
    lora1, lora_metas = gen(5, 1.0)
    lora0, _ = gen(5, 0.0)
    again, _ = gen(5)  # after the LoRA runs: ComfyUI took its patches off again
    out.update(shape=list(a.shape), finite=bool(torch.isfinite(a).all()), same_seed=float((a - b).abs().max()),
               other_seed=float((a - c).abs().max()), lora_change=float((lora1 - a).abs().max()),
               lora_zero=float((lora0 - a).abs().max()), after_lora=float((again - a).abs().max()), meta=metas[0],
               lora_meta=lora_metas[0]["loras"], progress=progress)

    # the pack's own split-file path on the same weights, same seed and prompts
    files = flux_pipeline.FluxFiles(diffusion_model=dm, clip_l=f"{TE}/clip_l_tiny.safetensors",
                                    t5xxl=f"{TE}/t5xxl_tiny_bf16.safetensors", vae=ae)
    handle = flux_pipeline.load_flux_files(files, "tiny-files", "fp32", CPU)
    request = flux_pipeline.FluxRequest(prompts=("a photo of a person", "a red car"), width=32, height=32, steps=3,
                                        guidance=3.5, seed=5)
    ref, _ = flux_pipeline.generate(handle, request, LoraStack(), LocalHost())
    ref_lora, _ = flux_pipeline.generate(handle, request, stack(1.0), LocalHost())
    out["vs_split_files"] = float((a - ref).abs().max())
    out["vs_split_files_lora"] = float((lora1 - ref_lora).abs().max())
    out["split_files_lora_change"] = float((ref_lora - ref).abs().max())
    # layouts ComfyUI cannot map for FLUX (diffusers names without a prefix, XLabs): the native pipe converts them
    # with the pack's converter and must match the split-file path, which converts them the same way
    import tempfile

    from FLENwheel.engines.lora_formats import linear_modules
    from FLENwheel.nodes.lora_stack_nodes import FLENApplyLoraStack
    from lora_layouts import make_reference, write_layout
    from safetensors.torch import save_file

    linears = linear_modules(handle.pipe.transformer)  # peft-wrapped by now: under their own names
    out["converted"] = {}
    for layout in ("noprefix_ab", "xlabs"):
        tensors, meta, _covered, _dtype = write_layout(layout, make_reference(linears, seed=3, magnitude=0.3),
                                                       linears, "flux")
        path = f"{tempfile.mkdtemp()}/{layout}.safetensors"
        save_file(tensors, path, metadata=meta)
        entry = LoraStack((LoraEntry(f"{layout}.safetensors", path, 0.9),))
        try:
            FLENApplyLoraStack.execute(model, entry)
            comfy_alone = "applied"
        except FlenUserError as exc:
            comfy_alone = str(exc)
        native, _ = FLENFluxGenerate.execute(pipe, "a photo of a person\na red car", 32, 32, 3, 3.5, 5, 1,
                                             entry).args
        split, _ = flux_pipeline.generate(handle, request, entry, LocalHost())
        out["converted"][layout] = {"comfy_alone": comfy_alone, "vs_split_files": float((native - split).abs().max()),
                                    "change": float((native - a).abs().max())}

    # FLUX.1-dev's own schedule (resolution-dependent shift) on both paths
    from diffusers import FlowMatchEulerDiscreteScheduler

    full = sf.shipped_config(sf.FLUX_CONFIGS, "scheduler")
    handle.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(full)
    pipe.schedule = dict(full)
    dyn, _ = gen(5)
    ref_dyn, _ = flux_pipeline.generate(handle, request, LoraStack(), LocalHost())
    out["vs_split_files_dynamic"] = float((dyn - ref_dyn).abs().max())
    out["dynamic_change"] = float((dyn - a).abs().max())
    pipe.schedule = dict(schedule)

    try:
        _base_model("(the connected base pipe)", pipe, "flux_pipe", "FLEN Train Character LoRA")
    except FlenUserError as exc:
        out["trainer_error"] = str(exc)
    out["trainer_node"] = FLENTrainCharacterLoRA.define_schema().node_id
    try:
        FLENFluxFromComfy.execute(model, clip, native_vae_of_other_kind(), "x")
    except FlenUserError as exc:
        out["wrong_vae_error"] = str(exc)
    return out


def native_vae_of_other_kind():
    return qwen_vae(f"{VAE}/qwen_image_vae_tiny.safetensors")


# ---- Qwen-Image-Edit ------------------------------------------------------------------------------------------------

def qwen_vae(path: str) -> comfy.sd.VAE:
    import comfy.ldm.wan.vae as wan

    vcfg = meta_config(path, "vae")

    class TinyWan(wan.WanVAE):
        def __init__(self, **kw):
            super().__init__(**{**kw, "dim": vcfg["base_dim"], "z_dim": vcfg["z_dim"]})

    with replaced(wan, "WanVAE", TinyWan):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    vae.latent_channels = vcfg["z_dim"]
    vae.first_stage_model.load_state_dict(comfy.utils.load_torch_file(path), strict=True)
    return vae


# Qwen2.5-VL's special tokens: ComfyUI's Qwen-Image code looks them up by the real vocabulary's ids
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                    "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QWEN_VOCAB = 152064


def qwen_clip(path: str) -> comfy.sd.CLIP:
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qi
    from transformers import AutoTokenizer, Qwen2Tokenizer

    cfg = meta_config(path, "text_encoder")
    tc, vc = cfg["text_config"], cfg["vision_config"]
    tok_dir = sf.tokenizer_folder(sf.inspect_file(path), None, "Qwen2.5")
    tiny_ids = {t: AutoTokenizer.from_pretrained(tok_dir).convert_tokens_to_ids(t) for t in QWEN_SPECIAL_IDS}
    remap = {tiny_ids[t]: real for t, real in QWEN_SPECIAL_IDS.items()}
    text_fields = {"vocab_size": QWEN_VOCAB, "hidden_size": tc["hidden_size"],
                   "intermediate_size": tc["intermediate_size"],
                   "num_hidden_layers": tc["num_hidden_layers"], "num_attention_heads": tc["num_attention_heads"],
                   "num_key_value_heads": tc["num_key_value_heads"], "rms_norm_eps": tc["rms_norm_eps"],
                   "max_position_embeddings": tc["max_position_embeddings"],
                   "rope_theta": tc["rope_parameters"]["rope_theta"]}

    class TinyConfig(llama.Qwen25_7BVLI_Config):  # class attributes, not fields, in ComfyUI
        head_dim = tc["hidden_size"] // tc["num_attention_heads"]
        rope_dims = list(tc["rope_parameters"]["mrope_section"])

    class TinyVision(llama.qwen_vl.Qwen2VLVisionTransformer):
        def __init__(self, hidden_size=None, output_hidden_size=None, device=None, dtype=None, ops=None):
            super().__init__(hidden_size=vc["hidden_size"], output_hidden_size=vc["out_hidden_size"],
                             intermediate_size=vc["intermediate_size"], num_heads=vc["num_heads"],
                             num_layers=vc["depth"], patch_size=vc["patch_size"],
                             temporal_patch_size=vc["temporal_patch_size"], spatial_merge_size=vc["spatial_merge_size"],
                             window_size=vc["window_size"], device=device, dtype=dtype, ops=ops)
            self.fullatt_block_indexes = list(vc["fullatt_block_indexes"])

    class TinyVLModel(qi.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options=None):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(text_fields),
                dtype=dtype, special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                model_class=llama.Qwen25_7BVLI, enable_attention_masks=attention_mask,
                return_attention_masks=attention_mask, model_options=model_options or {})

    class TinyTE(qi.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen25_7b",
                                                 clip_model=TinyVLModel, model_options=model_options or {})

    class TinyVLTokenizer(qi.Qwen25_7BVLITokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            comfy.sd1_clip.SDTokenizer.__init__(
                self, tok_dir, pad_with_end=False, embedding_size=tc["hidden_size"], embedding_key="qwen25_7b",
                tokenizer_class=Qwen2Tokenizer, has_start_token=False, has_end_token=False, pad_to_max_length=False,
                max_length=99999999, min_length=1, pad_token=151643, tokenizer_data=tokenizer_data or {})

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            out = super().tokenize_with_weights(text, return_word_ids, **kwargs)
            return [[(remap.get(t[0], t[0]),) + tuple(t[1:]) for t in row] for row in out]

    class TinyTokenizer(qi.QwenImageTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            comfy.sd1_clip.SD1Tokenizer.__init__(self, embedding_directory=embedding_directory,
                                                 tokenizer_data=tokenizer_data or {}, name="qwen25_7b",
                                                 tokenizer=TinyVLTokenizer)
            self.llama_template = self.llama_template_images = "{}"  # the pack always passes its template

    with replaced(llama, "Qwen25_7BVLI_Config", TinyConfig), \
            replaced(llama.qwen_vl, "Qwen2VLVisionTransformer", TinyVision):
        clip = comfy.sd.CLIP(target=types.SimpleNamespace(clip=TinyTE, tokenizer=TinyTokenizer, params={}),
                             model_options={"dtype": torch.float32})
    sd = comfy.utils.load_torch_file(path)
    small = sd["model.embed_tokens.weight"]
    big = torch.zeros(QWEN_VOCAB, small.shape[1], dtype=small.dtype)
    big[: small.shape[0]] = small
    for tiny_id, real in remap.items():
        big[real] = small[tiny_id]
    sd["model.embed_tokens.weight"] = big
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    return clip


def run_qwen() -> dict:
    from FLENwheel.nodes.qwen_nodes import FLENAngleSweep, FLENQwenEdit, FLENQwenEditFromComfy
    from FLENwheel.nodes.training_nodes import FLENTrainEditorLoRA

    vae_path = f"{VAE}/qwen_image_vae_tiny.safetensors"
    vcfg = meta_config(vae_path, "vae")

    class TinyWanLatent(comfy.latent_formats.Wan21):
        latent_channels = vcfg["z_dim"]

        def __init__(self):
            self.scale_factor = 1.0
            self.latents_mean = torch.tensor(vcfg["latents_mean"]).view(1, -1, 1, 1, 1)
            self.latents_std = torch.tensor(vcfg["latents_std"]).view(1, -1, 1, 1, 1)

    dm = f"{DM}/qwen_image_edit_2509_tiny_bf16.safetensors"
    model = native_model(dm, TinyWanLatent())
    clip = qwen_clip(f"{TE}/qwen_2.5_vl_tiny.safetensors")
    vae = qwen_vae(vae_path)
    (pipe,) = FLENQwenEditFromComfy.execute(model, clip, vae, "tiny-native-qwen").args
    lora_a = f"{models_dir}/loras/flen-tiny/qwen_edit_lora_a.safetensors"
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 48, 64, 3, generator=gen)  # two sources, 4:3
    ref = torch.rand(1, 64, 64, 3, generator=gen)

    def stack(strength=None):
        if strength is None:
            return LoraStack()
        return LoraStack((LoraEntry("flen-tiny/qwen_edit_lora_a.safetensors", lora_a, strength),))

    def edit(seed, lora=None, cfg=1.0, batch=1, image2=None):
        return FLENQwenEdit.execute(pipe, image, "turn the head left", "blurry", 2, cfg, seed, 1.0, 80, 64, batch,
                                    stack(lora), image2).args

    progress: list = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total, preview is not None)))
    a, metas = edit(3, batch=2)
    comfy.utils.set_progress_bar_global_hook(None)
    b, _ = edit(3, batch=2)
    c, _ = edit(4, batch=2)
    lora1, lora_metas = edit(3, 1.0, batch=2)
    lora0, _ = edit(3, 0.0, batch=2)
    cfg, cfg_metas = edit(3, cfg=3.0, batch=2)
    with_ref, _ = edit(3, batch=2, image2=ref)
    sweep, sweep_metas, prompts, labels = FLENAngleSweep.execute(
        pipe, image[:1], "model-card head angles", "", "en", 1.0, "", 2, 1.0, 9, 1.0, 80, 64, stack(1.0)).args
    out = {"shape": list(a.shape), "finite": bool(torch.isfinite(a).all()), "same_seed": float((a - b).abs().max()),
           "other_seed": float((a - c).abs().max()), "batch_seeds_differ": float((a[0] - a[1]).abs().max()),
           "lora_change": float((lora1 - a).abs().max()), "lora_zero": float((lora0 - a).abs().max()),
           "cfg_change": float((cfg - a).abs().max()), "ref_change": float((with_ref - a).abs().max()),
           "metas": [{k: m[k] for k in ("seed", "model", "source_index", "width", "height")} for m in metas],
           "lora_meta": lora_metas[0]["loras"], "cfg_meta": cfg_metas[0]["true_cfg"], "progress": progress,
           "sweep_shape": list(sweep.shape), "sweep_labels": labels, "sweep_meta_labels":
           [m["label"] for m in sweep_metas]}
    # the condition image reaches Qwen2.5-VL as an image embedding (ComfyUI swaps it in for <|image_pad|>)
    tokens = clip.tokenize("Picture 1: <|vision_start|><|image_pad|><|vision_end|>turn", images=[ref],
                           llama_template="{}")
    out["vl_image_slots"] = sum(isinstance(t[0], dict) for row in tokens["qwen25_7b"] for t in row)
    try:
        _base_model("(the connected base pipe)", pipe, "qwen_pipe", "FLEN Train Editor LoRA")
    except FlenUserError as exc:
        out["trainer_error"] = str(exc)
    out["trainer_node"] = FLENTrainEditorLoRA.define_schema().node_id
    try:
        FLENQwenEditFromComfy.execute(model, flux_clip(f"{TE}/clip_l_tiny.safetensors",
                                                       f"{TE}/t5xxl_tiny_bf16.safetensors"), vae, "x")
    except FlenUserError as exc:
        out["wrong_clip_error"] = str(exc)
    return out


if __name__ == "__main__":
    result = run_flux() if which == "flux" else run_qwen()
    print("RESULT " + json.dumps(result, default=str))
    sys.stdout.flush()
