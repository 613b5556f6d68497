"""Tiny randomly initialised Hugging Face models for fast tests."""

from __future__ import annotations

import torch

from slimc.program import RunContext


def tiny_llama(seed: int = 0, layers: int = 2):
    """A small random `LlamaForCausalLM` (vocab 128, hidden 64, tied embeddings), fp32, eval mode.

    Args:
        seed: torch seed for the random weights.
        layers: number of decoder layers.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


def tiny_gemma2(seed: int = 0, layers: int = 2):
    """A small random `Gemma2ForCausalLM`: `x * (1 + w)` RMSNorms and sandwich norms, GQA 4/2.

    Every norm weight is randomized (Gemma initializes them to zero) so that folding a scale into
    `1 + w` is exercised with non-trivial weights.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    return model


def tiny_opt(seed: int = 0, layers: int = 2):
    """A small random `OPTForCausalLM`: LayerNorms with biases, linears with biases, tied head."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # norms start as (1, 0) and biases as 0: make them all matter
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.uniform_(-0.5, 0.5)
    return model


def tiny_tokenizer():
    """A small word-level `PreTrainedTokenizerFast` (vocab < 128) for tests that save tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


class TinyMLP(torch.nn.Module):
    """Two linears with a SiLU between them (`fc1`, `fc2`); the smallest model with linears."""

    def __init__(self, hidden: int = 64, intermediate: int = 128, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, intermediate, bias=bias)
        self.act = torch.nn.SiLU()
        self.fc2 = torch.nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def example_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor]:
        """One fixed random input `[batch, seq, hidden]`."""
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, seq, self.fc1.in_features, generator=gen),)


def tiny_mlp(
    seed: int = 0, hidden: int = 64, intermediate: int = 128, bias: bool = True
) -> TinyMLP:
    """A random `TinyMLP` (hidden -> intermediate -> hidden), fp32, eval mode."""
    torch.manual_seed(seed)
    return TinyMLP(hidden, intermediate, bias).eval()


_CAPTURED: dict[str, object] = {}


def captured(name: str):
    """A fresh deep copy of a tiny model (`llama`, `gemma2`, `opt`; 2 layers, seed 0) captured once.

    Capturing takes seconds; tests in several modules share one capture per session.
    """
    import copy

    from slimc.capture import capture

    builders = {"llama": tiny_llama, "gemma2": tiny_gemma2, "opt": tiny_opt}
    if name not in _CAPTURED:
        _CAPTURED[name] = capture(builders[name](seed=0, layers=2))
    return copy.deepcopy(_CAPTURED[name])


def tiny_gpt2(seed: int = 0, layers: int = 2):
    """A small random `GPT2LMHeadModel`: `Conv1D` linears (weights stored [in, out], `addmm` in the
    graph), LayerNorms, fused c_attn, tied head; norms and biases randomized."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(torch.float32).eval()
    _randomize_norms_and_biases(model)
    return model


def tiny_falcon(seed: int = 0, layers: int = 2):
    """A small random `FalconForCausalLM`: `FalconLinear` (`x @ W.T + b` in the graph) with
    biases, multi-query attention, parallel attention/MLP; norms and biases randomized."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        bias=True,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = FalconForCausalLM(config).to(torch.float32).eval()
    _randomize_norms_and_biases(model)
    return model


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """LayerNorms start as (1, 0) and biases as 0: make them all matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.uniform_(-0.5, 0.5)


def tiny_decoder(config_class: str, model_class: str, seed: int = 0, layers: int = 2, **config):
    """A small random decoder of any transformers family (vocab 128, hidden 64, 4 heads), fp32,
    eval mode, every norm weight in U(0.5, 1.5) and every bias in U(-0.5, 0.5).

    Args:
        config_class: name of the config class in `transformers` (`"GPTNeoXConfig"`, ...).
        model_class: name of the model class in `transformers` (`"GPTNeoXForCausalLM"`, ...).
        seed: torch seed for the random weights.
        layers: number of decoder layers.
        config: more config arguments (they override the tiny sizes).
    """
    import transformers

    kwargs = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **config,
    }
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    model = model.to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for module in model.modules():
            norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if norm and name == "weight":
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
                elif name == "bias":
                    param.copy_(torch.rand(param.shape, generator=gen) - 0.5)
    return model


def tiny_gpt_neox(seed: int = 0, layers: int = 2):
    """GPT-NeoX: LayerNorms with biases, fused query_key_value, parallel attention + MLP."""
    return tiny_decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", seed, layers)


def tiny_stablelm(seed: int = 0, layers: int = 2):
    """StableLM: LayerNorms with biases read by linears without biases, GQA 4/2."""
    return tiny_decoder(
        "StableLmConfig", "StableLmForCausalLM", seed, layers, num_key_value_heads=2
    )


def tiny_olmo(seed: int = 0, layers: int = 2):
    """OLMo: non-parametric LayerNorms (no weight, no bias)."""
    return tiny_decoder("OlmoConfig", "OlmoForCausalLM", seed, layers)


def tiny_cohere(seed: int = 0, layers: int = 2):
    """Cohere: a LayerNorm written out in ops (mean, sub, pow), parallel attention + MLP, tied
    head, logits scaled."""
    return tiny_decoder("CohereConfig", "CohereForCausalLM", seed, layers, logit_scale=0.5)


def tiny_gemma3(seed: int = 0, layers: int = 2):
    """Gemma3: `x * (1 + w)` RMSNorms, sandwich norms, q/k norms, GQA 4/2."""
    return tiny_decoder(
        "Gemma3TextConfig", "Gemma3ForCausalLM", seed, layers, num_key_value_heads=2, head_dim=16
    )


def tiny_olmo2(seed: int = 0, layers: int = 2):
    """OLMo2: RMSNorms after each sublayer only (post-norms), q/k norms."""
    return tiny_decoder("Olmo2Config", "Olmo2ForCausalLM", seed, layers)


def with_token_calibration(program, samples: int, length: int, seed: int = 1):
    """`program` with `samples` calibration samples of `length` random token ids each (batch 1,
    vocabulary 128, drawn from `seed`) and no progress bars; returned for chaining."""
    gen = torch.Generator().manual_seed(seed)
    program.calibration = [
        (torch.randint(0, 128, (1, length), generator=gen),) for _ in range(samples)
    ]
    program.context = RunContext(progress=False)
    return program


def float_logits(program, ids: torch.Tensor) -> torch.Tensor:
    """The logits `program` computes for `ids`, in float64 (first output of a tuple)."""
    with torch.no_grad():
        out = program(ids)
    return (out[0] if isinstance(out, (tuple, list)) else out).double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((out - ref).abs().max() / ref.abs().max())
