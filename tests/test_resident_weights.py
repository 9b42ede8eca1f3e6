"""Offloading by keeping the host copy (engines/resident_weights.py), checked on the CPU with ``meta``.

On ``meta`` nothing is copied, so the checks are about bookkeeping: after a load every tensor is on the device
(the same walker as tests/test_device_moves.py), after an offload every tensor is the very host storage it was
before the load (no copy was made), what changed on the device is what an offload copies back, and tensors that
left the module are forgotten. The copies themselves, pinned memory and the speed are checked on the GPU by
benchmarks/bench_moves.py and benchmarks/gpu_smoke.py.
"""

from __future__ import annotations

import torch
from test_device_moves import META, _flux_inputs, _two_loras, tensors_elsewhere

from engines import flux_pipeline
from engines.resident_weights import ResidentWeights

CPU = torch.device("cpu")


def _storage(module: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in list(module.named_parameters()) + list(module.named_buffers())}


def test_offload_returns_the_same_host_storage_and_the_model_still_runs(tiny_models):
    handle = flux_pipeline.load_flux(tiny_models / "diffusers" / "flen-tiny-flux", "flen-tiny-flux", "fp32", CPU)
    transformer = handle.pipe.transformer
    handle.adapters.apply(_two_loras(tiny_models, "flux"))
    torch.manual_seed(0)
    inputs = _flux_inputs(transformer, CPU)
    with torch.no_grad():
        reference = transformer(**inputs)[0]
    before = _storage(transformer)
    params_before = {n: p for n, p in transformer.named_parameters()}

    resident = ResidentWeights(transformer)
    assert ResidentWeights.supports(transformer)
    resident.to_device(META)
    assert tensors_elsewhere(transformer, META) == []
    assert resident.changed_on_device() == []
    with torch.no_grad():
        assert transformer(**_flux_inputs(transformer, META))[0].device == META

    resident.to_host(CPU)
    assert tensors_elsewhere(transformer, CPU) == []
    assert _storage(transformer) == before  # the host copy itself came back: nothing was copied
    assert all(p is params_before[n] for n, p in transformer.named_parameters())  # same Parameter objects
    assert resident.stats.copied_back_bytes == 0 and resident.stats.swapped_back_bytes > 0
    with torch.no_grad():
        assert torch.equal(transformer(**inputs)[0], reference)

    # a second round trip reuses the records
    resident.to_device(META)
    resident.to_host(CPU)
    assert _storage(transformer) == before


def test_what_changed_on_the_device_is_what_an_offload_copies_back_and_what_left_is_forgotten():
    """The offload copies back exactly the tensors ``changed_on_device`` names (one predicate decides both;
    a copy out of ``meta`` cannot be made on the CPU, the GPU smoke run makes it)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].register_buffer("scale", torch.ones(2))
    model[0].register_buffer("pair", torch.zeros(2, 4), persistent=False)
    resident = ResidentWeights(model)
    resident.to_device(META)
    assert resident.changed_on_device() == []
    with torch.no_grad():
        model[0].weight.add_(1.0)  # an in-place update on the device (a merged LoRA would do this)
    model[1].register_buffer("made_here", torch.zeros(2, device=META))  # created on the device
    model[1].bias.data = torch.zeros(2, device=META)  # replaced on the device
    assert sorted(resident.changed_on_device()) == ["0.weight", "1.bias", "1.made_here"]

    del model[0].pair  # an unstacked LoRA pair leaves the module: its host copy must not stay alive
    resident.to_device(META)
    assert not any(key[2] == "pair" for key in resident._records)
    assert any(key[2] == "scale" for key in resident._records)


def test_quantised_parameter_types_are_left_to_their_own_move():
    class Params4bit(torch.nn.Parameter):  # the shape of bitsandbytes' type: a Parameter subclass
        pass

    layer = torch.nn.Linear(4, 4)
    assert ResidentWeights.supports(layer)
    layer.weight = Params4bit(torch.zeros(4, 4))
    assert not ResidentWeights.supports(layer)


def test_weights_loaded_under_inference_mode_round_trip():
    """ComfyUI runs nodes under inference_mode, so the split-file loaders' weights are inference tensors, which
    keep no version counter (the GPU smoke run failed on every workflow until this was handled)."""
    with torch.inference_mode():
        model = torch.nn.Linear(4, 4)
        model.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    assert model.weight.is_inference()
    before = model.weight.data_ptr()
    resident = ResidentWeights(model)
    resident.to_device(META)
    assert model.weight.device == META and resident.changed_on_device() == []
    resident.to_host(CPU)
    assert model.weight.device == CPU and model.weight.data_ptr() == before
    assert resident.stats.copied_back_bytes == 0
