"""One host copy of a model's weights, kept while the model is on the GPU, so that offloading needs no copy.

``Module.to("cpu")`` copies every weight into freshly allocated pageable memory (~1.5 GB/s measured on the GPU
machine: 12 s for the 20 GB Qwen transformer), and the next load copies it back from pageable memory (~7 GB/s).
The weights of an inference model never change on the GPU, so the host can keep its copy — pinned where RAM
allows, so the next load runs at the link's speed — and an offload only drops the GPU copy. Whatever did change
on the device (a tensor updated in place, or one created there, such as a stacked LoRA pair) is copied back as
``Module.to`` would, so nothing is lost.

Host RAM: the model's full size for as long as it is cached (``Module.to`` frees the host copy while the model
is on the GPU). Pinned memory is page-locked: ``pin_limit_bytes`` bounds how much of it one process takes.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch


def default_pin_limit() -> int:
    """Half the machine's RAM: page-locked memory cannot be swapped, and the rest of the system needs room."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 0


_live: weakref.WeakSet = weakref.WeakSet()  # every ResidentWeights alive: their pinned bytes count together


def pinned_bytes() -> int:
    """Page-locked host memory held by this process's ResidentWeights (a released one no longer counts)."""
    return sum(r.stats.pinned_bytes for r in list(_live))


def _is_pinned(t: torch.Tensor) -> bool:
    # asking a CPU-only process whether memory is pinned would initialise CUDA
    return t.device.type == "cpu" and torch.cuda.is_available() and t.is_pinned()


@dataclass
class MoveStats:
    to_device_bytes: int = 0
    swapped_back_bytes: int = 0  # offloaded by dropping the device copy (no copy)
    copied_back_bytes: int = 0  # offloaded by copying (changed or created on the device)
    pinned_bytes: int = 0


@dataclass
class _Record:
    host: torch.Tensor
    param: torch.nn.Parameter | None = None  # the module's own Parameter object, handed back on offload
    device_version: int = -1  # the tensor's version counter right after it was put on the device
    # The device storage the load made, held so that its address cannot be reused by a replacement (data_ptr
    # cannot tell tensors apart on meta, and a freed StorageImpl's address comes back for the next one).
    device_storage: torch.UntypedStorage | None = None


def _version(t: torch.Tensor) -> int:
    """The version counter; -1 for inference tensors (weights loaded under inference_mode), which keep none and
    cannot be written in place outside inference mode — their storage identity is what tells a change."""
    return -1 if t.is_inference() else t._version


def _put(m: torch.nn.Module, kind: str, name: str, t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Puts ``value`` in the module's slot as Module._apply does: a parameter keeps its Parameter object where the
    tensor types allow it (CPU <-> CUDA), else gets a new one; a buffer is replaced. Returns what now sits there."""
    if kind == "b":
        m._buffers[name] = value
        return value
    if torch._has_compatible_shallow_copy_type(t, value):
        t.data = value
        return t
    p = m._parameters[name] = torch.nn.Parameter(value, requires_grad=t.requires_grad)
    return p


def _unchanged(rec: _Record, t: torch.Tensor) -> bool:
    """Still the tensor the load put on the device, never written in place since (its version counter)."""
    return (rec.device_storage is not None and t.untyped_storage()._cdata == rec.device_storage._cdata
            and rec.device_version == _version(t))


@dataclass(eq=False)  # identity semantics: instances live in a WeakSet
class ResidentWeights:
    """Moves ``module``'s parameters and buffers between the host and a device, keeping the host copy."""

    module: torch.nn.Module
    pin: bool = True
    pin_limit_bytes: int = field(default_factory=default_pin_limit)
    stats: MoveStats = field(default_factory=MoveStats)
    _records: dict[tuple[int, str, str], _Record] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _live.add(self)

    @staticmethod
    def supports(module: torch.nn.Module) -> bool:
        """Plain tensors only: quantised parameter types (bitsandbytes' Params4bit…) carry device state of their
        own that only their ``.to`` knows how to move."""
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None and type(p) is not torch.nn.Parameter:
                    return False
            for b in m._buffers.values():
                if b is not None and type(b) is not torch.Tensor:
                    return False
        return True

    def _slots(self):
        for m in self.module.modules():
            for kind, table in (("p", m._parameters), ("b", m._buffers)):
                for name, t in list(table.items()):
                    if t is not None:
                        yield (id(m), kind, name), m, kind, name, t

    def _host_copy(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The tensor as it will be kept on the host: pinned when allowed and the device is a CUDA one."""
        host = t.detach()
        size = host.numel() * host.element_size()
        if (self.pin and device.type == "cuda" and not _is_pinned(host)
                and pinned_bytes() + size <= self.pin_limit_bytes):
            try:
                host = host.pin_memory()
            except RuntimeError:  # the OS refused to lock more pages: stay pageable
                return host
            self.stats.pinned_bytes += size
        return host

    def to_device(self, device: torch.device | str) -> None:
        device = torch.device(device)
        seen = set()
        for key, m, kind, name, t in self._slots():
            seen.add(key)
            if t.device == device:
                continue
            rec = self._records.get(key)
            if rec is None or rec.host.data_ptr() != t.data_ptr():
                self._drop(key)
                rec = self._records[key] = _Record(self._host_copy(t, device),
                                                   t if isinstance(t, torch.nn.Parameter) else None)
            on_device = rec.host.to(device, non_blocking=_is_pinned(rec.host))
            rec.device_version = _version(_put(m, kind, name, t, on_device))
            rec.device_storage = on_device.untyped_storage()
            self.stats.to_device_bytes += on_device.numel() * on_device.element_size()
        self._forget_all_but(seen)

    def to_host(self, host_device: torch.device | str = "cpu") -> None:
        host_device = torch.device(host_device)
        seen = set()
        for key, m, kind, name, t in self._slots():
            seen.add(key)
            if t.device == host_device:
                continue
            size = t.numel() * t.element_size()
            rec = self._records.get(key)
            if rec is not None and _unchanged(rec, t):
                rec.device_storage = None
                host = rec.host
                self.stats.swapped_back_bytes += size
                if kind == "p" and rec.param is not None and rec.param is not t:
                    rec.param.data = host
                    m._parameters[name] = rec.param
                    continue
            else:  # changed or created on the device: keep what it is now (pinned again at the next load)
                host = t.detach().to(host_device)
                self._drop(key)
                self.stats.copied_back_bytes += size
            _put(m, kind, name, t, host)
        self._forget_all_but(seen)

    def changed_on_device(self) -> list[str]:
        """Names of the tensors an offload would have to copy back (for tests and logs)."""
        names = {id(m): n for n, m in self.module.named_modules()}
        out = []
        for key, m, _kind, name, t in self._slots():
            rec = self._records.get(key)
            if rec is not None and rec.host.data_ptr() == t.data_ptr() and rec.host.device == t.device:
                continue  # on the host already
            if rec is None or not _unchanged(rec, t):
                prefix = names.get(id(m), "")
                out.append(f"{prefix}.{name}" if prefix else name)
        return out

    def _drop(self, key: tuple[int, str, str]) -> None:
        rec = self._records.pop(key, None)
        if rec is not None and _is_pinned(rec.host):
            self.stats.pinned_bytes -= rec.host.numel() * rec.host.element_size()

    def _forget_all_but(self, keys: set) -> None:
        """Tensors that left the module (an unstacked LoRA pair) must not keep their host copy alive."""
        for key in [k for k in self._records if k not in keys]:
            self._drop(key)
