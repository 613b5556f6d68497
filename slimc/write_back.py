"""Write-back: copy a program's transformed weights into the user's model and swap its layers."""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from slimc.errors import UserError
from slimc.ir.builder import constant_value
from slimc.kernel import binding_of
from slimc.linear_forms import RECOGNIZED_LINEARS_KEY, TRANSPOSED_WEIGHTS_KEY
from slimc.linear_match import match_qdq_linear, qdq_constants
from slimc.nn import (
    HadamardInputRotation,
    HadamardRotation,
    KernelLinear,
    OutputBias,
    QuantizedLinear,
)
from slimc.ops.fused import bound_args, fused_linear_kind
from slimc.program import SCHEME_KEY, Program, node_loc
from slimc.rotate.online import ONLINE_INPUT_ROTATION_KEY, ONLINE_ROTATION_KEY
from slimc.smooth.shift import NORM_BIAS_KEY
from slimc.write_back_experts import write_back_experts

log = logging.getLogger(__name__)


def quantized_linear_from_node(program: Program, node: fx.Node) -> QuantizedLinear:
    """Build the runtime module equivalent to one fused linear node."""
    scheme = node.meta[SCHEME_KEY]
    fused = fused_linear_kind(node)
    assert fused is not None
    args = fused.read(node)
    qweight, scale, zp, bias = (
        constant_value(program, a)
        for a in (args.weight, args.weight_scale, args.weight_zero_point, args.bias)
    )
    input_scale = input_zp = None
    if scheme.activation is not None and not scheme.activation.dynamic:
        input_scale = constant_value(program, args.input_scale)
        input_zp = constant_value(program, args.input_zero_point)
    assert qweight is not None and scale is not None
    in_features = qweight.shape[1] * (2 if scheme.weight.bits == 4 else 1)
    out_features = node.meta["val"].shape[-1]
    return QuantizedLinear(
        scheme,
        in_features,
        out_features,
        qweight,
        scale,
        zp,
        bias,
        None if input_scale is None else input_scale.reshape(-1),
        None if input_zp is None else input_zp.reshape(-1),
    )


def quantized_linear_from_qdq(program: Program, node: fx.Node) -> QuantizedLinear | None:
    """Build the runtime module for a QDQ-form quantized linear (pipelines that stop at QDQ)."""
    m = match_qdq_linear(node)
    if m is None:
        return None
    return QuantizedLinear.from_codes(m.scheme, **qdq_constants(program, m))


def kernel_linear_from_node(program: Program, node: fx.Node) -> KernelLinear:
    """Build the runtime module for a linear a lowering pass bound to one kernel op."""
    binding = binding_of(node)
    assert binding is not None and isinstance(node.target, torch._ops.OpOverload)
    arg_spec: list[tuple[str, object]] = []
    buffers: dict[str, torch.Tensor] = {}
    for i, arg in enumerate(node.args[1:]):
        if isinstance(arg, fx.Node):
            tensor = constant_value(program, arg)
            if tensor is None:
                raise UserError(f"kernel op {node.name}: argument {i + 1} is not a constant")
            buffers[f"arg{i}"] = tensor
            arg_spec.append(("buffer", f"arg{i}"))
        else:
            arg_spec.append(("value", arg))
    x_val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return KernelLinear(
        node.target.name(),
        binding.kernel,
        int(x_val.shape[-1]) if x_val is not None else -1,
        int(node.meta["val"].shape[-1]),
        arg_spec,
        buffers,
    )


def _rotates_its_input(node: fx.Node) -> bool:
    """Whether a kernel op applies the online input rotation itself (signs as its 2nd arg)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and "hadamard" in target.name()


def _replacement(program: Program, node: fx.Node) -> nn.Module | None:
    if binding_of(node) is not None:
        return kernel_linear_from_node(program, node)
    if fused_linear_kind(node) is not None:
        return quantized_linear_from_node(program, node)
    if node.target is torch.ops.aten.linear.default:
        return quantized_linear_from_qdq(program, node)
    return None


def _module_at(model: nn.Module, path: str | None) -> tuple[nn.Module, str, nn.Module | None]:
    parent_path, _, leaf = (path or "").rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        return parent, leaf, getattr(parent, leaf, None)
    except AttributeError:
        return model, leaf, None


def _wrap_with_bias(model: nn.Module, program: Program, node: fx.Node) -> None:
    """Write back a bias a smoothing shift added after a norm: wrap the norm module."""
    path = node_loc(node)
    parent, leaf, module = _module_at(model, path)
    if module is None or not leaf:
        raise UserError(f"cannot write back the bias added after {path!r}: no such module")
    bias = constant_value(program, node.args[1])
    assert bias is not None
    if isinstance(module, OutputBias):
        module.bias.copy_(bias)
    else:
        setattr(parent, leaf, OutputBias(module, bias))


def _wrap_with_rotation(model: nn.Module, program: Program, node: fx.Node) -> None:
    """Write back an online rotation of a module's output: wrap the module.

    Raises:
        UserError: the rotated value is not the output of a module of `model`.
    """
    path = node_loc(node)
    value = bound_args(node)["x"]
    parent, leaf, module = _module_at(model, path)
    readers = [u for u in node.users if node_loc(u) == path]
    if module is None or not leaf or not isinstance(value, fx.Node) or readers:
        raise UserError(
            f"cannot write back the online rotation after {path!r}: not a module's output"
        )
    signs = constant_value(program, bound_args(node)["signs"])
    assert signs is not None
    if isinstance(module, HadamardRotation):
        module.signs.copy_(signs)
    else:
        setattr(parent, leaf, HadamardRotation(module, signs))


def _wrap_with_input_rotation(model: nn.Module, program: Program, node: fx.Node) -> None:
    """Write back an online rotation of a linear's input: wrap the linear (after it was replaced).

    Raises:
        UserError: the rotation's reader is not a module of `model`.
    """
    path = node_loc(node)
    parent, leaf, module = _module_at(model, path)
    if module is None or not leaf:
        raise UserError(f"cannot write back the input rotation of {path!r}: no such module")
    signs = constant_value(program, bound_args(node)["signs"])
    assert signs is not None
    if isinstance(module, HadamardInputRotation):
        module.signs.copy_(signs)
    else:
        setattr(parent, leaf, HadamardInputRotation(module, signs))


def _add_missing_bias(
    model: nn.Module, program: Program, node: fx.Node, params: dict[str, torch.Tensor]
) -> None:
    """Give a float nn.Linear the bias a pass created for it in the graph."""
    bias = bound_args(node)["bias"]
    if not isinstance(bias, fx.Node) or str(bias.target) in params:
        return
    _, _, module = _module_at(model, node_loc(node))
    if isinstance(module, nn.Linear) and module.bias is None:
        value = constant_value(program, bias)
        assert value is not None
        module.bias = nn.Parameter(value.detach().clone().to(module.weight.dtype))


def _untie_parameters(model: nn.Module, program: Program) -> None:
    """Give each name of a shared (tied) parameter its own copy when the program now holds
    different values under those names (a rotation untied `lm_head` from the embedding), and
    record in the config that the embeddings are no longer tied, so that a save reloads both."""
    named = dict(model.named_parameters(remove_duplicate=False))
    by_param: dict[int, list[str]] = {}
    store = program.weights
    for target in dict.fromkeys(store.names()):
        if target in named:
            by_param.setdefault(id(named[target]), []).append(target)
    untied = False
    for names in by_param.values():
        if len(names) < 2 or not any(store.is_written(n) for n in names):
            continue  # one name, or none written: still the same tensor
        values = [store.get(n) for n in names]
        if all(torch.equal(v, values[0]) for v in values[1:]):
            continue
        for name in names[1:]:
            parent, leaf, old = _module_at(model, name)
            assert isinstance(old, nn.Parameter)
            setattr(parent, leaf, nn.Parameter(old.detach().clone(), old.requires_grad))
            log.info("untied %s from %s", name, names[0])
        untied = True
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # type: ignore[union-attr]
        text_config = getattr(config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}


def _replace_tensor(model: nn.Module, target: str, value: torch.Tensor) -> None:
    """Make `value` the parameter or buffer `target` of `model` (a new tensor, same kind)."""
    parent, leaf, old = _module_at(model, target)
    if isinstance(old, nn.Parameter):
        setattr(parent, leaf, nn.Parameter(value.detach(), old.requires_grad))
    else:
        parent._buffers[leaf] = value.detach()


def _check_replaceable(program: Program, path: str | None, old: nn.Module | None) -> None:
    """Refuse to replace a module that is neither a linear nor one canonicalize recognised as one.

    Raises:
        UserError: `old` is not a layer computing the linear at `path`.
    """
    if isinstance(old, (nn.Linear, QuantizedLinear, KernelLinear)):
        return
    recognized = program.metadata.get(RECOGNIZED_LINEARS_KEY, {})
    if old is not None and path in recognized:
        return
    raise UserError(f"cannot write back quantized linear {path!r}: not an nn.Linear in the model")


def _replaced_type(old: nn.Module | None) -> str | None:
    """The class name write-back records on a quantized layer replacing a non-Linear module."""
    if isinstance(old, (QuantizedLinear, KernelLinear)):
        return old.replaced_type
    return None if isinstance(old, nn.Linear) else type(old).__name__


def write_back(model: nn.Module, program: Program) -> None:
    """Copy transformed weights into `model` and swap quantized linears for QuantizedLinear
    (and experts modules with quantized stacks for QuantizedExperts).

    Weights the program holds transposed (GPT-2's `Conv1D`, stored [in, out]) are stored back in
    the module's layout; a quantized linear canonicalize recognised from a matmul / addmm form
    replaces the module that computed it, as for an `nn.Linear`.

    Raises:
        UserError: a fused linear whose module path is neither an `nn.Linear` of `model` nor a
            module canonicalize recognised as a linear.
    """
    _untie_parameters(model, program)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    transposed = set(program.metadata.get(TRANSPOSED_WEIGHTS_KEY, ()))
    for target, tensor in program.weights.written_items():
        param = params.get(target)
        if param is None or param.data_ptr() == tensor.data_ptr():
            continue
        if target in transposed:  # held [out, in] by the program, [in, out] by the module
            tensor = tensor.transpose(-2, -1)
        if param.shape != tensor.shape:
            raise UserError(
                f"cannot write back {target!r}: shape {tuple(tensor.shape)} "
                f"!= the model's {tuple(param.shape)}"
            )
        if program.weight_source is not None:  # the model's tensors may be the user's: not written
            _replace_tensor(model, target, tensor.to(param.dtype, copy=True))
            continue
        with torch.no_grad():
            param.copy_(tensor)
    input_rotations = []
    for node in program.graph.nodes:
        if node.meta.get(ONLINE_INPUT_ROTATION_KEY):
            input_rotations.append(node)  # wrapped once the linear itself is replaced
            continue
        if node.meta.get(NORM_BIAS_KEY):
            _wrap_with_bias(model, program, node)
            continue
        if node.meta.get(ONLINE_ROTATION_KEY):
            _wrap_with_rotation(model, program, node)
            continue
        if node.target is torch.ops.aten.linear.default:
            _add_missing_bias(model, program, node, params)
        new = _replacement(program, node)
        if new is None:
            continue
        path = node_loc(node)
        try:
            parent_path, _, leaf = (path or "").rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, leaf)
        except AttributeError:
            old = None
        if isinstance(old, HadamardInputRotation) and not _rotates_its_input(node):
            parent, leaf, old = old, "module", old.module
        elif isinstance(old, HadamardInputRotation):  # the kernel op now does the rotation
            old = old.module
        _check_replaceable(program, path, old)
        new.replaced_type = _replaced_type(old)
        setattr(parent, leaf, new)
    for node in input_rotations:
        _wrap_with_input_rotation(model, program, node)
    write_back_experts(model, program)
