"""lower-triton: bindings from each family's `select`, and lowered models equal to the reference."""

from __future__ import annotations

import pytest
import torch

import slimc
import slimc.kernels.w4a16 as w4a16
import slimc.kernels.w8a8 as w8a8
from slimc.kernel import binding_of
from slimc.nn import HadamardInputRotation, KernelLinear
from tests.models import tiny_llama, tiny_mlp

ops = torch.ops.slimc


@pytest.mark.parametrize(
    ("pipeline", "kernel"),
    [
        ("w8a8-dynamic", "triton.w8a8.auto"),
        ("w4a8", "triton.w8a8.auto"),
        ("w4a4", "triton.w8a8.auto"),
        ("w4a16{group-size=32}", "triton.w4a16.auto"),
    ],
)
def test_dynamic_shapes_bind_the_auto_kernel_and_match_the_reference(pipeline: str, kernel: str):
    """Captured LLMs have a dynamic batch and sequence: the kernel is chosen per call."""
    model = tiny_llama(seed=0, layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = slimc.compile(model, pipeline, progress=False)
    lowered = slimc.compile(model, f"{pipeline},lower-triton{{device=default}}", progress=False)
    kernels = [m for m in lowered.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 14 and {m.kernel for m in kernels} == {kernel}
    with torch.inference_mode():  # on CPU the kernel ops run the reference ops
        torch.testing.assert_close(lowered(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("pipeline", ["w4a16{group-size=32}", "w8a8-dynamic"])
def test_static_shapes_bind_the_selected_kernel_and_config(pipeline: str):
    model = tiny_mlp(seed=0)
    lowered = slimc.compile(
        model, f"{pipeline},lower-triton{{device=default}}", example_inputs=model.example_inputs()
    )
    nodes = [n for n in lowered.slimc_program.graph.nodes if binding_of(n) is not None]
    assert len(nodes) == 2
    family = w4a16 if pipeline.startswith("w4a16") else w8a8
    for node in nodes:
        binding = binding_of(node)
        kernel, values = node.args[-2:] if family is w4a16 else node.args[-3:-1]
        assert binding.kernel == f"triton.{kernel}" and not kernel.endswith(".auto")
        n = node.meta["val"].shape[-1]
        k = node.args[0].meta["val"].shape[-1]
        if family is w4a16:
            expected = family.select(n, k, 16, 32, "default")
        else:
            expected = family.select(n, k, 16, "default")
        assert (kernel, dict(binding.config)) == expected
        assert family.config_from_values(kernel, values) == expected[1]


def test_weight_only_int8_stays_fused():
    lowered = slimc.compile(tiny_llama(seed=0, layers=1), "w8a16,lower-triton", progress=False)
    assert lowered.slimc_program.statistics["lower-triton"]["left fused (reference kernels)"] == 7


def test_online_rotation_fuses_into_the_kernel_op_and_matches_the_reference():
    """quarot's run-time Hadamard on down_proj joins the per-token quantization and GEMM."""
    pipeline = "quarot{online-inputs=down_proj},w8a8-dynamic"
    model = tiny_llama(seed=0, layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = slimc.compile(model, pipeline, progress=False)
    lowered = slimc.compile(model, f"{pipeline},lower-triton{{device=default}}", progress=False)
    fused = [m for m in lowered.modules() if isinstance(m, KernelLinear) and "+" in m.kernel]
    assert [m.op_name for m in fused] == ["slimc::triton_linear_w8a8_hadamard"] * 2
    assert not any(isinstance(m, HadamardInputRotation) for m in lowered.modules())
    graph = lowered.slimc_program.graph
    assert not any(n.target is ops.hadamard.default for n in graph.nodes)
    with torch.inference_mode():  # on CPU the kernel op runs hadamard + quantize + linear
        torch.testing.assert_close(lowered(ids).logits, reference(ids).logits)


def test_fused_rotation_op_equals_its_reference_ops():
    import slimc.kernels.hadamard_quant as hq
    from slimc.rotate.hadamard import random_signs

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 48, generator=gen)
    signs = random_signs(48, seed=1)
    qweight = torch.randint(-127, 128, (24, 48), dtype=torch.int8, generator=gen)
    w_scale, bias = torch.rand(24, 1, generator=gen) / 100, torch.randn(24, generator=gen)
    xq, x_scale = ops.hadamard_quantize_per_token(x, signs, -128, 127)
    expected = ops.linear_w8a8(xq, x_scale, None, qweight, w_scale, bias, torch.float32)
    kernel, config = hq.select(48, 15, "default")
    got = ops.triton_linear_w8a8_hadamard(
        x, signs, qweight, w_scale, bias, -128, 127, kernel, hq.config_values(kernel, config),
        "w8a8.auto", [], None,
    )  # fmt: skip
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="unknown hadamard_quant kernel 'no.such'"):
        ops.triton_linear_w8a8_hadamard(
            x, signs, qweight, w_scale, bias, -128, 127, "no.such", [], "w8a8.auto", [], None
        )
