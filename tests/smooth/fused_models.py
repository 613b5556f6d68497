"""Tiny decoders with fused projections (Phi-3, GPT-NeoX) and a weightless LayerNorm (OLMo)."""

from __future__ import annotations

import copy

import torch
from torch import nn

SIZES = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Norm weights moved off one and biases drawn from U(-0.5, 0.5), so folds into them matter."""
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=gen) - 0.5
            if name.endswith("bias"):
                param.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                param.add_(noise)
    return model.eval()


def tiny_phi3(seed: int = 0) -> nn.Module:
    """`Phi3ForCausalLM`: fused `qkv_proj` (GQA 4/2) and fused `gate_up_proj`, RMSNorm."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**SIZES, num_key_value_heads=2)).to(torch.float32)
    return _randomize(model, seed)


def tiny_gpt_neox(seed: int = 0) -> nn.Module:
    """`GPTNeoXForCausalLM`: fused `query_key_value` interleaved per head, LayerNorm, biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**SIZES)).to(torch.float32)
    return _randomize(model, seed)


def tiny_olmo(seed: int = 0) -> nn.Module:
    """`OlmoForCausalLM`: LayerNorms without weight or bias (nothing to fold a scale into)."""
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(seed)
    model = OlmoForCausalLM(OlmoConfig(**SIZES, num_key_value_heads=2)).to(torch.float32)
    return _randomize(model, seed)


BUILDERS = {"phi3": tiny_phi3, "gpt_neox": tiny_gpt_neox, "olmo": tiny_olmo}
_CAPTURED: dict[str, object] = {}


def captured_family(name: str):
    """A fresh deep copy of the captured tiny model `name` (captured once per session)."""
    from slimc.capture import capture

    if name not in _CAPTURED:
        _CAPTURED[name] = capture(BUILDERS[name](seed=0))
    return copy.deepcopy(_CAPTURED[name])
