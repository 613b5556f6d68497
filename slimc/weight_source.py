"""Weights a program computes on in a wider dtype than they are stored in (a bf16 checkpoint in float32)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger(__name__)

_NARROW_FLOATS = (torch.bfloat16, torch.float16)


class WeightSource:
    """The stored tensors of a model's weights, by name, read one at a time in the compute dtype.

    The tensors are the model's own (for a checkpoint loaded in its dtype, memory-mapped from its
    safetensors files): `read` returns a converted copy and never writes them, so a program
    reading its weights from here holds at most the float32 copies of the weights it is working
    on, not a float32 copy of the model.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor holding the weight `name` converted to `dtype` (exact for a widening)."""
        return self._tensors[name].to(dtype=dtype, copy=True)

    def forget(self, name: str) -> None:
        """Drop the reference to weight `name` (the program no longer reads it), so a tensor
        nothing else holds (a MoE stack transformers fused while loading) is freed."""
        self._tensors.pop(name, None)

    def stored(self, name: str) -> torch.Tensor:
        """The weight `name` as stored (the model's tensor itself: read it, never write it)."""
        return self._tensors[name]

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self._tensors.values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def needs_widening(model: nn.Module, compute_dtype: torch.dtype | None) -> bool:
    """Whether `model` stores floating weights narrower than `compute_dtype` (bf16 in float32)."""
    if compute_dtype is None:
        return False
    return any(_widens(t, compute_dtype) for t in _tensors(model))


def _widens(t: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    return t.dtype in _NARROW_FLOATS and t.dtype != compute_dtype and not t.is_meta


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from (p for p in module._parameters.values() if p is not None)
        yield from (b for b in module._buffers.values() if b is not None)


@contextlib.contextmanager
def meta_weights(model: nn.Module, compute_dtype: torch.dtype) -> Iterator[WeightSource]:
    """Inside, each narrow floating parameter and buffer of `model` is a meta tensor of
    `compute_dtype` (so `torch.export` traces a `compute_dtype` graph without materializing any
    weight); the source maps every name of such a tensor (tied names included) to the tensor.
    The model is restored on exit."""
    tensors: dict[str, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    metas: dict[int, torch.Tensor] = {}  # id(original) -> its meta stand-in
    originals: dict[int, torch.Tensor] = {}  # id(meta) -> original (a module seen twice)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for leaf, t in list(table.items()):
                name = f"{module_name}.{leaf}" if module_name else leaf
                if t is not None and id(t) in originals:
                    tensors[name] = originals[id(t)].detach()
                    continue
                if t is None or not _widens(t, compute_dtype):
                    continue
                meta = metas.get(id(t))
                if meta is None:  # tied tensors (one object under two names) share one meta
                    meta = torch.empty(t.shape, dtype=compute_dtype, device="meta")
                    if kind == "param":
                        meta = nn.Parameter(meta, requires_grad=False)
                    metas[id(t)] = meta
                    originals[id(meta)] = t
                tensors[name] = t.detach()
                table[leaf] = meta
                swapped.append((module, leaf, kind == "param", t))
    source = WeightSource(tensors)
    log.info(
        "capturing in %s with %d weights (%.0f MB) read from their %s storage one at a time",
        compute_dtype,
        len(source),
        source.nbytes() / 2**20,
        ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})),
    )
    try:
        yield source
    finally:
        for module, leaf, is_param, original in reversed(swapped):
            (module._parameters if is_param else module._buffers)[leaf] = original


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules (and config) that shares every parameter and buffer with it:
    write-back then replaces tensors in the copy instead of writing into the user's."""
    memo: dict[int, object] = {}
    for t in _tensors(model):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


def rebind_meta_device(graph: fx.Graph, device: torch.device) -> int:
    """Replace the meta device a capture on meta weights baked into the graph (`arange(device=
    meta)` for positions made on the weights' device, the fake values of activations) with
    `device`; returns how many nodes had it in their arguments."""
    meta = torch.device("meta")

    def fix(value: Any) -> Any:
        if isinstance(value, torch.device) and value == meta:
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v) for v in value)
        return value

    def fix_val(value: Any) -> None:
        if isinstance(value, FakeTensor) and value.fake_device == meta:
            value.fake_device = device
        elif isinstance(value, (list, tuple)):
            for v in value:
                fix_val(v)

    count = 0
    for node in graph.nodes:
        fix_val(node.meta.get("val"))
        args = tuple(fix(a) for a in node.args)
        kwargs = {k: fix(v) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            count += 1
    return count


def source_device(source: WeightSource) -> torch.device:
    """The device the source's tensors live on (where the program computes)."""
    devices = {t.device for t in source._tensors.values()}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


@contextlib.contextmanager
def widened_forward(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside, `model` computes in `dtype`: each module holding narrower floating tensors (a bf16
    checkpoint) gets `dtype` copies of them for the time of its own forward only, so a bf16
    model evaluates as its float32 version would with one module's weights widened at a time."""
    saved: dict[int, list[list[tuple[dict[str, Any], str, torch.Tensor]]]] = {}

    def widen(module: nn.Module, _args: Any) -> None:
        frame = []
        for table in (module._parameters, module._buffers):
            for leaf, t in list(table.items()):
                if t is None or not _widens(t, dtype):
                    continue
                wide = t.detach().to(dtype)
                table[leaf] = (
                    nn.Parameter(wide, requires_grad=False) if table is module._parameters else wide
                )
                frame.append((table, leaf, t))
        saved.setdefault(id(module), []).append(frame)

    def restore(module: nn.Module, _args: Any, _out: Any) -> None:
        for table, leaf, t in saved[id(module)].pop():
            table[leaf] = t

    handles = []
    for module in model.modules():
        if any(
            _widens(t, dtype)
            for t in (*module._parameters.values(), *module._buffers.values())
            if t is not None
        ):
            handles.append(module.register_forward_pre_hook(widen))
            handles.append(module.register_forward_hook(restore, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
