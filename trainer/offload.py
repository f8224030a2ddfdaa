"""Activation offload for checkpointed decoder layers (JobSpec.checkpoint_offload).

With non-reentrant gradient checkpointing (trainer.methods) a checkpointed layer keeps only its
inputs for backward: torch's checkpoint saves them, outside its own saved-tensor hooks, before
the layer runs, and the layer's inner activations go to the checkpoint's holders and are
recomputed. So `saved_tensors_hooks` around the checkpoint call see exactly those inputs (the
residual stream, batch x seq x hidden per layer); the checkpoint's own hooks, innermost, take
precedence for everything inside the layer, in forward and in the recompute.

Pack (forward): a CUDA tensor of at least `min_bytes` that is no parameter (nor a view of one)
is copied into pinned host memory on a side stream that first waits for the current stream (the
producing kernels); `record_stream` keeps the caching allocator from reusing the device memory
before the copy has read it. Anything else stays as it is (position ids, masks, rope cos/sin).

Unpack (backward, when the layer's recompute starts): the copy back runs on the side stream into
memory allocated on the current stream, after the side stream waited for the current one (so
that memory's earlier users are done); the current stream waits for the copy's event before the
recompute reads it. The unpack of layer i also starts the copy back of the input packed just
before it (layer i-1's), which the backward needs next: that copy overlaps layer i's recompute
and backward. At most the current and the prefetched layer's inputs are on the GPU then.

On a CPU the tensors already live in host memory: packing keeps a reference (`copy_on_host` makes
it copy, which the tests use to exercise the copy and restore), through the same bookkeeping.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

# Smaller saved tensors stay where they are: copying them costs more than they occupy.
MIN_OFFLOAD_BYTES = 1 << 20


class _Packed:
    """A saved tensor that waits in host memory; `prev` is the one packed before it."""

    __slots__ = ("host", "device", "copied", "fetched", "ready", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Any, prev: Any) -> None:
        self.host = host
        self.device = device
        self.copied = copied  # event after the copy to the host (CUDA), else None
        self.fetched: torch.Tensor | None = None  # the copy back, once started
        self.ready: Any = None  # event after the copy back (CUDA)
        self.prev = prev  # weakref of the record packed before this one, or None


class CheckpointOffload:
    """Pack/unpack hooks that move checkpointed layers' inputs to host memory and back.

    Counters (for tests and the start event): `packed` tensors moved since the last
    `reset_counts`, `kept_small` and `kept_parameters` left on the device.
    """

    def __init__(self, model: Any = None, *, min_bytes: int = MIN_OFFLOAD_BYTES, copy_on_host: bool = False) -> None:
        self.min_bytes = min_bytes
        self.copy_on_host = copy_on_host
        self._streams: dict[torch.device, Any] = {}
        self._last: Any = None  # weakref of the latest _Packed
        # A backward ran since the latest pack: the next pack starts a new chain, so that a
        # backward never brings back an input of an earlier step's graph that is still referenced.
        self._unpacked_since_pack = False
        # Storages of the model's parameters: a saved tensor on one of them is a weight (or a view).
        self._param_storages: set[int] = set()
        if model is not None:
            self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self.reset_counts()

    def reset_counts(self) -> None:
        self.packed = 0
        self.packed_bytes = 0
        self.unpacked = 0
        self.kept_small = 0
        self.kept_parameters = 0

    # --- the hooks ---------------------------------------------------------------------------

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _is_parameter(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return True
        try:
            return t.untyped_storage().data_ptr() in self._param_storages
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return True

    def pack(self, t: torch.Tensor) -> Any:
        if self._is_parameter(t):
            self.kept_parameters += 1
            return t
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or t.is_sparse or t.layout != torch.strided:
            self.kept_small += 1
            return t
        prev = None if self._unpacked_since_pack else self._last
        self._unpacked_since_pack = False
        if t.device.type == "cuda":
            record = self._pack_cuda(t, prev)
        elif t.device.type == "cpu":
            host = torch.empty_like(t).copy_(t.detach()) if self.copy_on_host else t.detach()
            record = _Packed(host, t.device, None, prev)
        else:  # another accelerator: left where it is
            self.kept_small += 1
            return t
        self._last = weakref.ref(record)
        self.packed += 1
        self.packed_bytes += nbytes
        return record

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        self.unpacked += 1
        self._unpacked_since_pack = True
        if packed.device.type == "cuda":
            if packed.fetched is None:
                self._fetch(packed)
            torch.cuda.current_stream(packed.device).wait_event(packed.ready)
            out = packed.fetched
            # The device copy belongs to this backward from now on; the host copy stays for a
            # second backward over the same graph (retain_graph).
            packed.fetched = packed.ready = None
            # The backward needs the input packed before this one next: start bringing it back.
            prev = packed.prev() if packed.prev is not None else None
            if prev is not None and prev.fetched is None and prev.host is not None:
                self._fetch(prev)
            return out
        host = packed.host
        return host.clone() if self.copy_on_host else host

    # --- CUDA copies -------------------------------------------------------------------------

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _pack_cuda(self, t: torch.Tensor, prev: Any) -> _Packed:
        side = self._stream(t.device)
        # The side stream reads t only after the kernels that wrote it (queued on the current stream).
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            copied = side.record_event()
        # t's memory goes back to the allocator when autograd drops it; not for reuse before the
        # side stream's copy has read it.
        t.record_stream(side)
        return _Packed(host, t.device, copied, prev)

    def _fetch(self, packed: _Packed) -> None:
        current = torch.cuda.current_stream(packed.device)
        side = self._stream(packed.device)
        # Allocated on the current stream (which frees it after the recompute); the side stream
        # writes it only after the current stream's earlier work, which may still use that memory.
        out = torch.empty_like(packed.host, device=packed.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # Same stream as the copy to the host: ordered after it.
            out.copy_(packed.host, non_blocking=True)
            packed.ready = side.record_event()
        packed.fetched = out


def _offloaded(checkpoint_func: Any, offload: CheckpointOffload) -> Any:
    @functools.wraps(checkpoint_func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with offload.hooks():
            return checkpoint_func(*args, **kwargs)

    run.__tuneq_offload__ = offload  # type: ignore[attr-defined]
    return run


def attach_checkpoint_offload(model: Any, **kwargs: Any) -> CheckpointOffload:
    """Offload the inputs of the model's checkpointed decoder layers; returns the hooks' owner.

    transformers runs a checkpointed layer through the layer's own `_gradient_checkpointing_func`
    (torch's checkpoint, set by gradient_checkpointing_enable); wrapping it puts the offload hooks
    around exactly that call, for the layers whose flag is on (speed balanced turns the upper
    layers' off), through peft's wrappers and liger's patched modules alike.
    """
    from trainer.errors import ConfigError
    from trainer.methods import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    offload = CheckpointOffload(model, **kwargs)
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is None:
            raise ConfigError("checkpoint_offload: needs a transformers model whose decoder layers are "
                              "checkpointed one by one; turn it off for this model")
        inner = getattr(func, "__wrapped__", func) if hasattr(func, "__tuneq_offload__") else func
        layer._gradient_checkpointing_func = _offloaded(inner, offload)
    return offload
