"""Tiny random-weight models of every decoder family slimc claims, and what to expect of each."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention where the family has it


@dataclass(frozen=True)
class Family:
    """One decoder family: how to build it and what slimc should do with it.

    Attributes:
        config_class / model_class: names in `transformers`.
        config: keyword arguments of the config on top of the shared tiny sizes.
        gqa: whether the config takes `num_key_value_heads` (set to 2 of 4 heads).
        layer_norm: the residual stream is normalised by a LayerNorm (mean subtraction).
        save_format: the format `slimc.save` writes for it (`compressed-tensors` or `pt2`).
        sandwich_norms: norms on a block's output before the residual add (Gemma2/3, OLMo2).
        fused_projections: one linear computes q, k, v (or gate, up) together.
        gated_mlp: the MLP is `down(act(gate(x)) * up(x))` (an up -> down smoothing group).
        pre_norm_groups: each layer's linears read a norm with a weight that a smoothing scale
            folds into (not OLMo's weightless LayerNorm, not OLMo2's norms after each block).
        bitwise_capture: the captured graph computes bit for bit what the model computes
            (Falcon's `x @ W.T + b` becomes one `aten.linear`: the bias is added in the product;
            GPT-2's `addmm` on an [in, out] weight becomes a linear on the transposed weight,
            whose multi-threaded GEMM sums in another order).
    """

    config_class: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    gqa: bool = True
    layer_norm: bool = False
    save_format: str = "compressed-tensors"
    sandwich_norms: bool = False
    fused_projections: bool = False
    gated_mlp: bool = True
    pre_norm_groups: bool = True
    bitwise_capture: bool = True

    def build(self, seed: int = 0) -> nn.Module:
        """The tiny random model, fp32, eval mode, norms and biases randomized."""
        transformers = importlib.import_module("transformers")
        kwargs: dict[str, Any] = {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "max_position_embeddings": 256,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.gqa:
            kwargs["num_key_value_heads"] = KV_HEADS
        kwargs.update(self.config)
        config = getattr(transformers, self.config_class)(**kwargs)
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(config).to(torch.float32).eval()
        randomize_norms_and_biases(model, seed)
        return model


def randomize_norms_and_biases(model: nn.Module, seed: int = 0) -> None:
    """Move every norm weight by U(-0.5, 0.5) and draw every bias from U(-0.5, 0.5).

    Norms start at one (or zero for `x * (1 + w)` norms) and biases at zero: randomized, folding a
    norm into a linear or a scale into a bias is exercised with non-trivial values.
    """
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                noise = torch.rand(param.shape, generator=gen) - 0.5
                if is_norm and name == "weight":
                    param.add_(noise)
                elif name == "bias":
                    param.copy_(noise)


FAMILY_SPECS: dict[str, Family] = {
    # RMSNorm, gated MLP, rotary: the Llama shape and its relatives
    "llama": Family("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": Family("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q/k norms
    "granite": Family("GraniteConfig", "GraniteForCausalLM", {"residual_multiplier": 0.5}),
    "smollm3": Family("SmolLM3Config", "SmolLM3ForCausalLM"),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, sandwich_norms=True),
    "gemma3": Family(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 8},
        sandwich_norms=True,
    ),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", sandwich_norms=True, pre_norm_groups=False),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", fused_projections=True),
    # LayerNorm families
    "opt": Family(
        "OPTConfig",
        "OPTForCausalLM",
        {"ffn_dim": 2 * HIDDEN, "word_embed_proj_dim": HIDDEN},
        gqa=False,
        layer_norm=True,
        gated_mlp=False,
    ),
    "gpt2": Family(
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256},
        gqa=False,
        layer_norm=True,
        gated_mlp=False,
        save_format="pt2",
        bitwise_capture=False,
    ),
    "gpt_neox": Family(
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        gqa=False,
        layer_norm=True,
        fused_projections=True,
        gated_mlp=False,
    ),
    "falcon": Family(
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": True, "num_kv_heads": KV_HEADS, "bias": True},
        gqa=False,
        layer_norm=True,
        fused_projections=True,
        gated_mlp=False,
        bitwise_capture=False,
    ),
    "falcon_mqa": Family(  # the Falcon-7B layout: multi-query, one norm for attention and MLP
        "FalconConfig",
        "FalconForCausalLM",
        {"multi_query": True, "bias": True},
        gqa=False,
        layer_norm=True,
        fused_projections=True,
        gated_mlp=False,
        bitwise_capture=False,
    ),
    "stablelm": Family("StableLmConfig", "StableLmForCausalLM", layer_norm=True),
    "olmo": Family("OlmoConfig", "OlmoForCausalLM", layer_norm=True, pre_norm_groups=False),
    "cohere": Family("CohereConfig", "CohereForCausalLM", {"logit_scale": 1.0}, layer_norm=True),
    "phi": Family(
        "PhiConfig",
        "PhiForCausalLM",
        {"partial_rotary_factor": 0.5},
        layer_norm=True,
        gated_mlp=False,
    ),
    "gptj": Family(
        "GPTJConfig",
        "GPTJForCausalLM",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256, "rotary_dim": 8},
        gqa=False,
        layer_norm=True,
        gated_mlp=False,
    ),
    "starcoder2": Family(
        "Starcoder2Config", "Starcoder2ForCausalLM", layer_norm=True, gated_mlp=False
    ),
    # newer relatives, each with a structure of its own
    "cohere2": Family(  # parallel attention and MLP, sliding-window layers
        "Cohere2Config",
        "Cohere2ForCausalLM",
        {"logit_scale": 1.0, "sliding_window": 8},
        layer_norm=True,
    ),
    "olmo3": Family(  # norms after each block only, sliding-window layers
        "Olmo3Config",
        "Olmo3ForCausalLM",
        {"sliding_window": 8},
        sandwich_norms=True,
        pre_norm_groups=False,
    ),
    "exaone4": Family(  # norms after each block only, q/k norms
        "Exaone4Config",
        "Exaone4ForCausalLM",
        {"sliding_window": 8},
        sandwich_norms=True,
        pre_norm_groups=False,
    ),
    "glm4": Family(  # sandwich norms, fused gate_up_proj, partial rotary
        "Glm4Config",
        "Glm4ForCausalLM",
        {"head_dim": 16},
        sandwich_norms=True,
        fused_projections=True,
    ),
    "gpt_bigcode": Family(  # StarCoder / SantaCoder: multi-query, fused c_attn
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256},
        gqa=False,
        layer_norm=True,
        fused_projections=True,
        gated_mlp=False,
    ),
}


def _factory(spec: Family) -> Callable[..., nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        return spec.build(seed)

    return build


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    name: _factory(spec) for name, spec in FAMILY_SPECS.items()
}


def linear_like_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that computes a linear (`nn.Linear` and its subclasses, GPT-2's `Conv1D`),
    less the output embedding (`lm_head`, which slimc leaves in float by default)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not head
    }
