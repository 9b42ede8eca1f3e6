"""Run in a subprocess (ComfyUI on sys.path): the bridge's ResidentPatcher inside ComfyUI's own manager code.

argv: COMFYUI_PATH REPO. Prints one JSON line. The load device is ``meta`` (CI has no GPU): ComfyUI's
``LoadedModel.model_load`` / ``model_unload`` drive the patcher exactly as ``load_models_gpu`` and a memory-freeing
unload do; the checks are that the weights reach the device, come back as the very host storage (no copy),
ComfyUI's bookkeeping says loaded / unloaded, a partial unload is refused (the model then unloads whole) and a
module with a quantised parameter type takes ModelPatcher's own path.
"""

import json
import os
import sys
import tempfile

comfy_path, repo = sys.argv[1:3]
sys.path.insert(0, comfy_path)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

pack_parent = tempfile.mkdtemp()
os.symlink(repo, os.path.join(pack_parent, "flen_pack"))
sys.path.insert(0, pack_parent)
from flen_pack.nodes import comfy_bridge as bridge  # noqa: E402

META, CPU = torch.device("meta"), torch.device("cpu")
out: dict = {}

module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
module[2].register_buffer("scale", torch.ones(8))
storage = {n: t.data_ptr() for n, t in list(module.state_dict(keep_vars=True).items())}
patcher = bridge.ResidentPatcher(bridge._Hosted(module), load_device=META, offload_device=CPU)
out["resident"] = patcher.resident is not None

loaded = mm.LoadedModel(patcher)
loaded.model_load(lowvram_model_memory=0)  # what load_models_gpu(..., force_full_load=True) calls
out["on_device_after_load"] = sorted({str(t.device) for t in module.state_dict(keep_vars=True).values()})
out["loaded_size_is_model_size"] = patcher.loaded_size() == patcher.model_size() > 0
out["device_attr"] = str(patcher.current_loaded_device())

out["partial_unload_freed"] = patcher.partially_unload(CPU, 1024)
out["lowvram_after_partial"] = bool(patcher.model.model_lowvram)
unloaded_whole = loaded.model_unload(memory_to_free=1024)  # ComfyUI freeing 1 KiB: the model goes whole
out["model_unload_returned"] = unloaded_whole
out["on_host_after_unload"] = sorted({str(t.device) for t in module.state_dict(keep_vars=True).values()})
out["same_host_storage"] = {n: t.data_ptr() for n, t in module.state_dict(keep_vars=True).items()} == storage
out["loaded_size_after_unload"] = patcher.loaded_size()
out["swapped_back_bytes"] = patcher.resident.stats.swapped_back_bytes
out["copied_back_bytes"] = patcher.resident.stats.copied_back_bytes


class Params4bit(torch.nn.Parameter):  # bitsandbytes' shape: a Parameter subclass with its own .to
    pass


quantised = torch.nn.Linear(8, 8)
quantised.weight = Params4bit(torch.zeros(8, 8))
fallback = bridge.ResidentPatcher(bridge._Hosted(quantised), load_device=META, offload_device=CPU)
out["quantised_resident"] = fallback.resident is not None
lm = mm.LoadedModel(fallback)
lm.model_load(lowvram_model_memory=0)
out["quantised_on_device"] = str(quantised.weight.device)  # (its way back copies: meta has nothing to copy)
print(json.dumps(out))
