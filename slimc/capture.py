"""Capture a PyTorch model as a slimc Program with torch.export (non-strict), then canonicalize."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from slimc import canonical
from slimc.errors import UserError, first_line
from slimc.program import LOC_KEY, Program
from slimc.stage import Stage
from slimc.weight_source import meta_weights, needs_widening, rebind_meta_device, source_device

log = logging.getLogger(__name__)

WRAPPER_ATTR = "lm"


class CausalLMLogits(nn.Module):
    """Wraps a Hugging Face causal LM so the exported graph maps input ids to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER_ATTR, model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = getattr(self, WRAPPER_ATTR)(input_ids=input_ids, use_cache=False)
        return out.logits


def is_hf_causal_lm(model: nn.Module) -> bool:
    try:
        # transformers takes seconds to import: loaded on first use
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "get_output_embeddings")


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """Token ids [2, 16] (batch 2 so the batch dimension stays dynamic)."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (2, 16), generator=gen),)


def exportable_token_ids(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[torch.Tensor]:
    """The user's token ids, widened to an example torch.export keeps dynamic in both dims.

    torch.export specializes a dimension whose example size is 1 (a batch-1 or one-token example
    would give a graph for that size only) and gives two dimensions with the same example size
    one symbol (a 3 x 3 example would tie batch to length). The ids are tiled to batch >= 2 and
    length >= 2, with length != batch; the values and dtype stay the user's.

    Raises:
        UserError: the example is not one tensor of integer token ids [batch, length] or [length].
    """
    items = list(example_inputs)
    ids = items[0] if len(items) == 1 else None
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype.is_floating_point
        or ids.is_complex()
        or ids.dim() not in (1, 2)
        or ids.numel() == 0
    ):
        got = (
            f"a {tuple(ids.shape)} {ids.dtype} tensor"
            if isinstance(ids, torch.Tensor)
            else f"{len(items)} inputs"
        )
        raise UserError(
            f"example_inputs for {type(model).__name__} must be one tensor of token ids "
            f"[batch, length]; got {got}"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    batch, length = ids.shape
    want_batch, want_length = max(batch, 2), max(length, 2)
    if want_length == want_batch:
        want_length += 1
    reps = (-(-want_batch // batch), -(-want_length // length))
    return (ids.repeat(*reps)[:want_batch, :want_length].contiguous(),)


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    canonicalize: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> Program:
    """Export `model` to one GraphModule with weights as constants and wrap it in a Program.

    Hugging Face causal LMs are captured as `input_ids -> logits` with dynamic batch and sequence
    length and the SDPA attention implementation; any example shape works (batch 1 and one token
    included: see `exportable_token_ids`), and the program keeps the widened example it was
    exported with. Other modules need `example_inputs` and are exported at their shapes.

    With `compute_dtype`, a model stored in a narrower float dtype (bf16) is traced on meta
    weights of `compute_dtype`: the program computes in it and reads each weight from the model
    when needed (`Program.weight_source`), so no weight is copied to capture.

    Raises:
        UserError: the model cannot be exported (the message gives torch.export's reason).
    """
    hf = is_hf_causal_lm(model)
    with _capture_implementations(model) if hf else contextlib.nullcontext():
        program = _capture(model, example_inputs, dynamic_shapes, compute_dtype, hf)
    if canonicalize:
        canonical.canonicalize(program)
    return program


def _capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | None,
    dynamic_shapes: Any,
    compute_dtype: torch.dtype | None,
    hf: bool,
) -> Program:
    """`capture` before canonicalization (a Hugging Face model already switched to the
    implementations capture needs)."""
    prefix = ""
    if hf:
        if example_inputs is None:
            example_inputs = default_example_inputs(model)
        if dynamic_shapes is None:
            example_inputs = exportable_token_ids(model, example_inputs)
            dynamic_shapes = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)
        target: nn.Module = CausalLMLogits(model)
        prefix = WRAPPER_ATTR + "."
    else:
        if example_inputs is None:
            raise UserError(
                f"{type(model).__name__} is not a Hugging Face causal LM: pass example_inputs"
            )
        target = model
    args = tuple(example_inputs)
    was_training = model.training
    model.eval()
    widen = needs_widening(model, compute_dtype)
    weights = meta_weights(model, compute_dtype) if widen else contextlib.nullcontext()
    try:
        with torch.no_grad(), weights as source:
            ep = torch.export.export(target, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        reason = first_line(exc)
        raise UserError(
            f"cannot export {type(model).__name__} with torch.export: {reason}"
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    _strip_prefix(gm, prefix)
    _set_locations(gm.graph, prefix)
    program = Program(gm, example_inputs=args, weight_source=source)
    if source is not None:
        rebind_meta_device(program.graph, source_device(source))
        gm.recompile()
    program.metadata.update(model_class=type(model).__name__, hf_causal_lm=hf)
    return program


@contextlib.contextmanager
def _capture_implementations(model: nn.Module) -> Iterator[None]:
    """Switch a Hugging Face model to the attention and experts implementations capture needs,
    and back to the user's afterwards (the captured graph does not depend on them later)."""
    attention = getattr(model.config, "_attn_implementation", None)
    get_experts = getattr(model, "get_experts_implementation", None)
    experts = get_experts() if callable(get_experts) else None
    _use_sdpa(model)
    _use_batched_experts(model)
    try:
        yield
    finally:
        if getattr(model.config, "_attn_implementation", None) != attention and attention:
            model.set_attn_implementation(attention)  # type: ignore[operator]
        if experts is not None and model.get_experts_implementation() != experts:  # type: ignore[operator]
            model.set_experts_implementation(experts)  # type: ignore[operator]


def program_from_graph_module(
    gm: fx.GraphModule, example_inputs: Sequence[Any], stage: Stage = Stage.ATEN
) -> Program:
    """Wrap an already unlifted graph module (e.g. loaded from `.pt2`) and canonicalize it."""
    _set_locations(gm.graph, "")
    program = Program(gm, stage=stage, example_inputs=tuple(example_inputs))
    canonical.canonicalize(program)
    return program


def _use_sdpa(model: nn.Module) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:  # the architecture has no SDPA path: capture its own attention
            log.info("%s has no SDPA attention; capturing %s", type(model).__name__, impl)
            return
        log.info("switched attention implementation %s -> sdpa for capture", impl)


def _use_batched_experts(model: nn.Module) -> None:
    """Mixture-of-experts layers through transformers' `batched_mm` experts: each token's chosen
    experts' weights are gathered (`aten.index`) and multiplied (`aten.bmm`), which exports
    exactly with dynamic shapes. The default `grouped_mm` is a transformers custom op, and
    `eager` loops over data-dependent token sets that torch.export cannot trace."""
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        return
    current = model.get_experts_implementation()  # type: ignore[operator]
    if set(current.values()) != {"batched_mm"}:
        model.set_experts_implementation("batched_mm")  # type: ignore[operator]
        log.info("switched experts implementation %s -> batched_mm for capture", current)


def _strip_prefix(gm: fx.GraphModule, prefix: str) -> None:
    """Move constants `lm.model.x.weight` to `model.x.weight` so names match the user's model."""
    if not prefix:
        return
    inner = getattr(gm, prefix.rstrip("."))
    for name, child in list(inner.named_children()):
        gm.add_module(name, child)
    for name, tensor in list(inner.named_parameters(recurse=False)) + list(
        inner.named_buffers(recurse=False)
    ):
        gm.register_buffer(name, tensor)
    delattr(gm, prefix.rstrip("."))
    name_prefix = prefix.replace(".", "_")
    for node in gm.graph.find_nodes(op="get_attr"):
        node.target = str(node.target).removeprefix(prefix)
        if node.name.startswith(name_prefix):
            node._rename(node.name.removeprefix(name_prefix))
    gm.recompile()


def _set_locations(graph: fx.Graph, prefix: str) -> None:
    for node in graph.nodes:
        if LOC_KEY in node.meta:
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        if not isinstance(path, str) or path.startswith("_"):
            continue
        path = path.removeprefix(prefix.rstrip(".")).lstrip(".") if prefix else path
        if path:
            node.meta[LOC_KEY] = path
