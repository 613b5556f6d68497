"""ResidualRotation: the engine of the residual-stream rotations (QuaRot and its learned variants).

It finds the stream, fuses the norms, folds an orthogonal hidden-size rotation into the
embedding and the linears reading and writing the stream, rotates attention heads, and inserts
the run-time rotations no weight can absorb. Which rotation is folded is the `hidden_rotation`
hook: QuaRot folds the random Hadamard itself, adapt-rotation refines it on data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.analyses.residual_stream import ResidualStream
from slimc.analysis import AnalysisManager
from slimc.errors import UserError
from slimc.linear_select import bias_index, float_linears, matches
from slimc.pass_base import OptionError, Pass, PassResult, option
from slimc.pipeline_spec import OptionValue
from slimc.program import Program, node_loc
from slimc.rotate import fold
from slimc.rotate.hadamard import DEFAULT_SEED, random_hadamard, random_signs
from slimc.rotate.mean_bake import bake_means, keeping_ones
from slimc.rotate.online import insert_input_rotation, insert_online_rotation
from slimc.stage import Stage

log = logging.getLogger(__name__)
aten = torch.ops.aten

OnlineMode = Literal["auto", "always", "never"]
ONLINE_ALIASES: dict[object, str] = {
    "true": "always",
    "false": "never",
    True: "always",
    False: "never",
}
"""Spellings of `online` kept from when it was a bool (`online=true` is `always`)."""


class RotationRefused(UserError):
    """The program has a part where the rotation would not be exact; the message names the node."""


@dataclass(frozen=True)
class HeadRotation:
    """A v -> o pair rotated per head: head size and the first v row of every head."""

    group: LinearGroup
    size: int
    starts: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class ResidualRotation(Pass):
    """Base of the residual-stream rotations: QuaRot's options, checks and folding.

    Not a pass itself (it declares no `name`): a pass subclasses it and names itself; the
    rotation it folds is `hidden_rotation` (the random Hadamard unless overridden). Exact.
    """

    accepts = frozenset({Stage.ATEN})
    produces = Stage.ATEN
    exact = True

    seed: int = option(DEFAULT_SEED, "Seed of the random sign flips of the Hadamard rotations.")
    rotate_heads: bool = option(
        True, "Also rotate each attention head's values (v_proj rows, o_proj columns)."
    )
    online: OnlineMode = option(
        "auto",
        "Values added to the stream that no weight absorbs (sandwich norms' outputs): auto and "
        "always rotate them at run time with slimc.hadamard, only where a fold is not exact "
        "(true = always); never refuses such models (false = never).",
    )
    online_inputs: tuple[str, ...] = option(
        (),
        "Module-path globs of linears whose input is also rotated at run time by a Hadamard "
        "of its width (QuaRot's down_proj rotation for 4-bit activations); W -> W Q is folded.",
    )

    def __post_init__(self) -> None:
        online = ONLINE_ALIASES.get(self.online, self.online)
        if online not in ("auto", "always", "never"):
            raise OptionError(
                f"option 'online' of pass {self.name!r}: bad value {self.online!r} "
                "(expected auto, always or never)"
            )
        object.__setattr__(self, "online", online)

    @classmethod
    def from_options(cls, options: dict[str, OptionValue]) -> Pass:
        """As `Pass.from_options`, with `online=true|false` read as `always|never`."""
        raw = options.get("online")
        aliased = raw is not None and len(raw) == 1 and raw[0].lower() in ONLINE_ALIASES
        if aliased and cls.option_types()["online"] == OnlineMode:
            assert raw is not None
            options = {**options, "online": (ONLINE_ALIASES[raw[0].lower()],)}
        return super().from_options(options)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        stream = am.get(ResidualStream)
        self._check(stream)
        try:
            q = random_hadamard(stream.hidden, self.seed)
        except ValueError as exc:
            raise RotationRefused(f"{self.name}: hidden size {stream.hidden}: {exc}") from None
        heads = self._head_rotations(am) if self.rotate_heads else []
        head_matrices = {h.size: random_hadamard(h.size, self.seed) for h in heads}

        inputs = self._online_input_linears(program)
        input_signs = {}
        for linear in inputs:
            k = int(linear.args[0].meta["val"].shape[-1])  # type: ignore[union-attr]
            try:
                input_signs.setdefault(k, random_signs(k, self.seed))
                random_hadamard(k, self.seed)
            except ValueError as exc:
                where = node_loc(linear) or linear.name
                raise RotationRefused(f"{self.name}: input of {where}: {exc}") from None
        self._untie(program, stream, heads, inputs)
        baked = bake_means(program, stream) if stream.mean_free_readers else 0
        norm_biases = [n.carrier.bias for n in stream.norms if fold.fuse_norm(program, n)]
        q = self.hidden_rotation(program, stream, q)
        if stream.centers:
            q = keeping_ones(q)
        for embedding in stream.embeddings:
            fold.rotate_embedding(program, embedding, q)
        for bias in norm_biases:
            assert bias is not None
            fold.rotate_bias(program, bias, q)
        for linear in stream.readers:
            fold.rotate_input(program, linear, q)
        for linear in stream.writers:
            fold.rotate_output(program, linear, q)
        for head in heads:
            fold.rotate_heads(program, head.group, head_matrices[head.size], head.starts)
        for linear in inputs:
            k = int(linear.args[0].meta["val"].shape[-1])  # type: ignore[union-attr]
            insert_input_rotation(program, linear, input_signs[k], origin=str(self))
        if stream.online:
            signs = random_signs(stream.hidden, self.seed)
            for point in stream.online:
                insert_online_rotation(program, point, signs, origin=str(self))
        program.recompile()

        self.stat(program, "fused norms", len(stream.norms))
        if stream.centers:
            self.stat(program, "mean-subtracting norms (LayerNorm)", _layer_norms(stream))
            self.stat(program, "mean-baked weights", baked)
            if norm_biases:
                self.stat(program, "norm biases rotated in place", len(norm_biases))
        self.stat(program, "rotated embeddings", len(stream.embeddings))
        self.stat(program, "rotated linears", len({*stream.readers, *stream.writers}))
        self.stat(program, "rotated attention heads (v/o pairs)", len(heads))
        if stream.online:
            self.stat(program, "online rotations", len(stream.online))
        if inputs:
            self.stat(program, "online input rotations", len(inputs))
        return PassResult(changed=True)

    def _online_input_linears(self, program: Program) -> list[fx.Node]:
        """The float linears `online-inputs` names (a glob matching none is an error)."""
        if not self.online_inputs:
            return []
        chosen = [n for n in float_linears(program) if matches(node_loc(n), self.online_inputs)]
        if not chosen:
            raise UserError(
                f"{self.name}: online-inputs={','.join(self.online_inputs)} matches no linear"
            )
        return chosen

    def hidden_rotation(
        self, program: Program, stream: ResidualStream, hadamard: torch.Tensor
    ) -> torch.Tensor:
        """The orthogonal hidden-size rotation to fold (float64), given the random Hadamard.

        Called once the norms are fused into their readers and before anything is rotated, so
        the program still computes the float model's function. QuaRot folds the Hadamard itself.
        """
        return hadamard

    def _check(self, stream: ResidualStream) -> None:
        if stream.refused:
            first = stream.refused[0]
            more = f" (and {len(stream.refused) - 1} more)" if len(stream.refused) > 1 else ""
            raise RotationRefused(f"{self.name}: cannot rotate the residual stream: {first}{more}")
        if stream.online and self.online not in ("auto", "always"):
            point = stream.online[0]
            raise RotationRefused(
                f"{self.name}: {point.value.name} ({node_loc(point.value) or '?'}) is added to the "
                f"residual stream at {point.add.name}, but {point.reason}: no weight can absorb "
                f"the rotation offline ({self.online_hint})"
            )
        if stream.online and stream.centers:
            point = stream.online[0]
            raise RotationRefused(
                f"{self.name}: {point.value.name} ({node_loc(point.value) or '?'}) is added to a "
                f"residual stream that {_where(stream.mean_readers[0])} centers, but "
                f"{point.reason}: an online Hadamard would not keep the stream's mean"
            )
        for norm in stream.norms:
            for const in (norm.carrier.weight, norm.carrier.bias):
                users = [u.name for u in const.users] if const is not None else []
                if const is not None and len(users) > 1:
                    raise RotationRefused(
                        f"{self.name}: norm constant {const.target} is shared by "
                        f"{', '.join(users)}; it cannot be fused into one norm's readers"
                    )

    @property
    def online_hint(self) -> str:
        """What to do about a value no weight can rotate, when this pass will not rotate it."""
        return "quarot{online=auto} rotates it at run time"

    def _head_rotations(self, am: AnalysisManager) -> list[HeadRotation]:
        """The v -> o groups whose value path moves whole heads; others are left unrotated."""
        out = []
        for group in am.get(LinearGroups).groups:
            if group.kind != "ov" or group.producer is None:
                continue
            size = fold.head_dim(group)
            starts = fold.head_blocks(group, size) if size else None
            if size is None or starts is None:
                log.info(
                    "%s: heads of %s are not rotated (no per-head value path)",
                    self.name,
                    group.name,
                )
                continue
            out.append(HeadRotation(group, size, starts))
        return out

    def _untie(
        self,
        program: Program,
        stream: ResidualStream,
        heads: list[HeadRotation],
        inputs: list[fx.Node],
    ) -> None:
        uses: list[tuple[fx.Node, int]] = [(e, 0) for e in stream.embeddings]
        uses += [(linear, fold.WEIGHT) for linear in inputs]
        uses += [(linear, fold.WEIGHT) for linear in (*stream.readers, *stream.writers)]
        uses += [(linear, bias_index(linear)) for linear in stream.writers]
        uses += [(lin, bias_index(lin)) for norm in stream.norms for lin in norm.readers]
        for head in heads:
            assert head.group.producer is not None
            uses += [(head.group.producer, fold.WEIGHT), (head.group.producer, fold.BIAS)]
            uses += [(t, fold.WEIGHT) for t in head.group.targets]
        moved = fold.untie(program, uses)
        tables = sum(n.target is aten.embedding.default for n in moved)
        if tables:
            self.stat(program, "untied embeddings", tables)
        if len(moved) > tables:
            self.stat(program, "untied weights", len(moved) - tables)


def _where(node: fx.Node) -> str:
    loc = node_loc(node)
    return f"{node.name} ({loc})" if loc else node.name


def _layer_norms(stream: ResidualStream) -> int:
    return sum(n.target is aten.layer_norm.default for n in stream.mean_readers) + sum(
        n.target in (aten.mean.dim, aten.sum.dim_IntList) for n in stream.mean_readers
    )
