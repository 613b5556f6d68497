"""Write a random-weight Llama-shaped checkpoint (one safetensors shard per decoder layer) for benchmarks.

Run: python -m slimc.tools.make_synthetic_llama --out DIR [--hidden 2560 --ffn 6912 --layers 24
     --heads 20 --kv-heads 4 --vocab 49152 --dtype bfloat16 --seed 0] [--tiny] [--overwrite]
     [--experts E --experts-per-token K]  (a Qwen3-MoE-shaped model, experts of width --ffn)

The defaults are the engine benchmark's model (about 3.8 GB in bf16). Every tensor is written to
its shard as it is generated, in row chunks, so the peak memory is a chunk plus the interpreter,
not a layer and never the model. Linear and embedding weights are normal with std 0.02 (Llama's
`initializer_range`), norm scales are 1. The SmolLM2 tokenizer (vocab 49152) is copied beside
the weights unless `--no-tokenizer`. The directory is written under a temporary name and renamed
into place, so an interrupted run leaves nothing at `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slimc.errors import UserError
from slimc.export.atomic import apply_umask
from slimc.tools._cli_common import run_guarded, setup_logging

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files copied from the packaged SmolLM2 checkpoint when present."""
INIT_STD = 0.02
CHUNK_ELEMENTS = 1 << 22
"""Values generated at a time (16 MB in fp32): bounds the generator's memory for any tensor."""
TINY = {"hidden": 64, "ffn": 176, "layers": 2, "heads": 4, "kv_heads": 2}
"""`--tiny`: a model small enough for tests (vocab stays 49152 to match the tokenizer)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a shard: its name, shape and how it is filled ('normal' or 'ones')."""

    name: str
    shape: tuple[int, ...]
    fill: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layer_tensors(
    i: int, hidden: int, ffn: int, heads: int, kv_heads: int, experts: int = 0
) -> list[TensorSpec]:
    """The tensors of decoder layer `i` under their transformers names: a Llama layer, or with
    `experts` a Qwen3-MoE one (q / k norms, a router and `experts` MLPs of width `ffn`)."""
    head_dim = hidden // heads
    p = f"model.layers.{i}"
    specs = [
        TensorSpec(f"{p}.input_layernorm.weight", (hidden,), "ones"),
        TensorSpec(f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden), "normal"),
        TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden), "normal"),
        TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden), "normal"),
        TensorSpec(f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim), "normal"),
        TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), "ones"),
    ]
    mlps = [f"{p}.mlp"]
    if experts:
        specs += [
            TensorSpec(f"{p}.self_attn.q_norm.weight", (head_dim,), "ones"),
            TensorSpec(f"{p}.self_attn.k_norm.weight", (head_dim,), "ones"),
            TensorSpec(f"{p}.mlp.gate.weight", (experts, hidden), "normal"),
        ]
        mlps = [f"{p}.mlp.experts.{e}" for e in range(experts)]
    for mlp in mlps:
        specs += [
            TensorSpec(f"{mlp}.gate_proj.weight", (ffn, hidden), "normal"),
            TensorSpec(f"{mlp}.up_proj.weight", (ffn, hidden), "normal"),
            TensorSpec(f"{mlp}.down_proj.weight", (hidden, ffn), "normal"),
        ]
    return specs


def outer_tensors(hidden: int, vocab: int) -> list[TensorSpec]:
    """Embeddings, final norm and the (untied) lm_head."""
    return [
        TensorSpec("model.embed_tokens.weight", (vocab, hidden), "normal"),
        TensorSpec("model.norm.weight", (hidden,), "ones"),
        TensorSpec("lm_head.weight", (vocab, hidden), "normal"),
    ]


def _chunks(spec: TensorSpec, dtype: torch.dtype, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The values of `spec` in row-major order, a bounded chunk at a time, already in `dtype`."""
    left = spec.numel
    while left:
        n = min(left, CHUNK_ELEMENTS)
        if spec.fill == "ones":
            yield torch.ones(n, dtype=dtype)
        else:
            yield (torch.randn(n, generator=gen) * INIT_STD).to(dtype)
        left -= n


def write_shard(
    path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, first_index: int
) -> int:
    """Stream `specs` into a safetensors file at `path`; returns the bytes of tensor data.

    Tensor k of the whole model (counted from `first_index`) draws from a generator seeded with
    `seed * 1_000_003 + k`, so every tensor is reproducible on its own.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = spec.numel * itemsize
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, spec in enumerate(specs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + first_index + k)
            for chunk in _chunks(spec, dtype, gen):
                f.write(chunk.view(torch.uint8).numpy().tobytes())
    return offset


def llama_config(args: argparse.Namespace, source_config: dict | None) -> dict:
    """config.json of the synthetic model, from transformers' LlamaConfig (Qwen3MoeConfig with
    `--experts`), with the token ids of `source_config`."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    ids = {}
    if source_config is not None:
        ids = {
            k: source_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if k in source_config
        }
    moe = {}
    if args.experts:
        moe = dict(
            num_experts=args.experts,
            num_experts_per_tok=args.experts_per_token,
            moe_intermediate_size=args.ffn,
            norm_topk_prob=True,
        )
    config = (Qwen3MoeConfig if args.experts else LlamaConfig)(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        **moe,
        **ids,
    )
    config.architectures = ["Qwen3MoeForCausalLM" if args.experts else "LlamaForCausalLM"]
    config.dtype = args.dtype
    generic = ("_name_or_path", "id2label", "label2id")  # PretrainedConfig's, not the model's
    return {k: v for k, v in config.to_dict().items() if k not in generic}


def check_shape(args: argparse.Namespace) -> None:
    """Refuse sizes a Llama cannot have, naming the option."""
    for name in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.hidden % args.heads:
        raise UserError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.experts < 0 or (args.experts and not 1 <= args.experts_per_token <= args.experts):
        raise UserError("--experts-per-token must be between 1 and --experts")


def tokenizer_source() -> tuple[Path, dict]:
    """The packaged SmolLM2 checkpoint directory and its config.json (for vocab and token ids)."""
    from slimc.data import smollm2_dir

    src = smollm2_dir()
    return src, json.loads((src / "config.json").read_text())


def make(args: argparse.Namespace) -> Path:
    """Write the checkpoint `args` describe; returns its directory."""
    check_shape(args)
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} exists and is not empty (give --overwrite to replace it)")
    src, src_config = (None, None) if args.no_tokenizer else tokenizer_source()
    if src_config is not None and args.vocab != src_config["vocab_size"]:
        raise UserError(
            f"--vocab {args.vocab} does not match the SmolLM2 tokenizer's "
            f"{src_config['vocab_size']} (give --no-tokenizer for another vocabulary)"
        )
    dtype = DTYPES[args.dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shards = [
            layer_tensors(i, args.hidden, args.ffn, args.heads, args.kv_heads, args.experts)
            for i in range(args.layers)
        ]
        shards.append(outer_tensors(args.hidden, args.vocab))
        weight_map: dict[str, str] = {}
        total = 0
        first = 0
        for n, specs in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            total += write_shard(tmp / name, specs, dtype, args.seed, first)
            first += len(specs)
            weight_map.update({s.name: name for s in specs})
            print(f"wrote {name} ({len(specs)} tensors)", file=sys.stderr, flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(
            json.dumps(llama_config(args, src_config), indent=2, sort_keys=True) + "\n"
        )
        for file in TOKENIZER_FILES if src is not None else ():
            if (src / file).is_file():
                shutil.copyfile(src / file, tmp / file)
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {total / 1e9:.2f} GB of {args.dtype} weights", file=sys.stderr)
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--ffn", type=int, default=6912, help="MLP intermediate size")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument(
        "--experts",
        type=int,
        default=0,
        help="a Qwen3-MoE model with this many experts per layer, each an MLP of width --ffn "
        "(default 0: a dense Llama)",
    )
    parser.add_argument("--experts-per-token", type=int, default=8, help="with --experts: top-k")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a test-sized model: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()),
    )
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="do not copy the SmolLM2 tokenizer"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    setup_logging(False)

    def body() -> int:
        make(args)
        return 0

    return run_guarded("make_synthetic_llama", body, False)


if __name__ == "__main__":
    sys.exit(main())
