"""quarot: QuaRot, a random Hadamard rotation of the residual stream folded into the weights."""

from __future__ import annotations

from dataclasses import dataclass

from slimc.rotate.residual import ResidualRotation


@dataclass(frozen=True, kw_only=True)
class QuaRot(ResidualRotation):
    """QuaRot: rotate the residual stream by a random Hadamard matrix Q folded into the weights.

    The residual stream is found in the graph (the ResidualStream analysis): the token embedding,
    the residual adds, the norms reading it, the linears writing into it (o_proj, down_proj) and
    those reading it (q/k/v, gate/up, lm_head). Each norm's scale is first fused into the linears
    that read it (RMSNorm `w -> 1`, `x * (1 + w)` norms `w -> 0`), which makes the norm commute
    with any orthogonal Q; then `E -> E Q` (embedding), `W -> Q^T W`, `b -> Q^T b` (writers) and
    `W -> W Q` (readers). An embedding table tied to lm_head is untied first (the two now differ).
    With `rotate-heads`, every attention head's value is also rotated by a head-size Hadamard
    (`W_v -> H^T W_v` per head, `W_o -> W_o H` per head block; grouped-query heads share v heads,
    which the ov channel map of LinearGroups confirms). Q = H diag(+-1) / sqrt(n) with seeded
    signs (msModelSlim's `random_hadamard_matrix`, seed 1234); non-power-of-two sizes use
    Paley x Sylvester Hadamard matrices. Reference: Ashkboos et al., QuaRot (2024).
    Values added to the stream that no weight produces (the outputs of Gemma2/Gemma3/OLMo2's
    post-sublayer "sandwich" norms) cannot be rotated offline: with `online=auto` (the default)
    each is rotated at run time by a `slimc.hadamard` op (Q itself, written back as
    `slimc.nn.HadamardRotation` around the norm) and counted as "online rotations";
    `online=always` does the same (`true` is its old spelling); `online=never` (`false`) refuses
    such models, naming the module. No online rotation is added where a fold is exact.
    LayerNorm streams (OPT, GPT-2, GPT-NeoX, Falcon, StableLM, OLMo, Cohere): a LayerNorm is
    `RMSNorm(x - mean(x)) * w + b`. First the means are baked into the writers (SliceGPT's and
    QuaRot's step): embedding rows, positional tables and every linear adding into the stream
    produce mean-free vectors (`E -> E - mean_c(E)`, `W -> (I - 11^T/d) W`, `b -> b - mean(b)`),
    exact because every reader of the stream subtracts the mean anyway (where one does not, the
    weights are left as they are). Then Q is made to keep the all-ones direction:
    `Q -> Q G`, G the Householder reflection taking `1 Q` back to `1` (Q is unchanged on the
    vectors orthogonal to both). Such a Q keeps the stream mean-free, so each LayerNorm, kept as
    it is in the graph and in the user's model, computes `RMSNorm(x) Q` on the rotated stream:
    modules and checkpoints keep their form (a general Hadamard Q would need the LayerNorms
    replaced by RMSNorms, which transformers cannot load). Such a Q alone already commutes with
    the mean subtraction (`mean(x Q) = mean(x)`); the baking removes the stream's mean, so no
    LayerNorm cancels a large mean in low precision, and leaves the writers' weights mean-free. The LayerNorm's weight is fused into
    its readers like an RMSNorm's; its bias goes into the readers' biases when all have one
    (`c -> c + W b`), else stays in the norm as `(b / w) Q` (a zero weight under a nonzero bias:
    readers are given biases). Online rotations are Hadamards that do not keep the all-ones
    direction, so a LayerNorm stream that needs them is refused.
    Exact: float outputs are unchanged. Anything else reading the stream in a way a rotation
    does not commute with is refused with the node named. `online-inputs` adds QuaRot's
    run-time rotation of chosen linears' inputs (down_proj): the input is rotated by a Hadamard
    of its width and the weight absorbs the inverse.
    """

    name = "quarot"
    cli_role = "rotation"
