"""Quantization schemes: how a linear's weight and input activation are quantized."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

Granularity = Literal["tensor", "channel", "group", "token"]

SchemeName = Literal["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8", "w4a4"]
"""The named plain schemes, as a pass option type."""

SCHEMES: tuple[SchemeName, ...] = typing.get_args(SchemeName)
"""The named plain schemes `make_scheme` builds, in the order the CLI lists them."""


@dataclass(frozen=True)
class TensorQuantSpec:
    """How one tensor is quantized to signed integers.

    Attributes:
        bits: integer width (4 or 8); values are stored signed in [-2^(b-1), 2^(b-1)-1].
        symmetric: zero point fixed at 0 when True; otherwise an integer zero point.
        granularity: one scale per tensor, per output channel, per group of `group_size`
            input elements, or per token (activations only).
        group_size: elements per group along the last dimension when granularity is "group".
        dynamic: activation scales computed at run time (per token) instead of calibrated.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = -1
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.granularity == "group" and self.group_size <= 0:
            raise ValueError(
                f"group granularity needs a positive group_size, got {self.group_size}"
            )
        if self.granularity != "group" and self.group_size != -1:
            raise ValueError(
                f"group_size={self.group_size} given with granularity={self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def block_size(self, shape: tuple[int, ...] | list[int]) -> list[int]:
        """Block size (one entry per dim, -1 = whole dim) that `slimc::*_affine` ops take."""
        rank = len(shape)
        if self.granularity == "tensor":
            return [-1] * rank
        if self.granularity in ("channel", "token"):
            return [1] * (rank - 1) + [-1]
        return [1] * (rank - 1) + [self.group_size]


@dataclass(frozen=True)
class LinearQuantScheme:
    """A linear layer's quantization: weight spec plus optional activation spec (None = float)."""

    name: str
    weight: TensorQuantSpec
    activation: TensorQuantSpec | None = None

    def with_weight(self, **changes: object) -> LinearQuantScheme:
        return dataclasses.replace(self, weight=dataclasses.replace(self.weight, **changes))


def _w(bits: int, symmetric: bool, group_size: int) -> TensorQuantSpec:
    if group_size > 0:
        return TensorQuantSpec(bits, symmetric, "group", group_size)
    return TensorQuantSpec(bits, symmetric, "channel")


def make_scheme(
    name: str, *, group_size: int = -1, symmetric: bool | None = None
) -> LinearQuantScheme:
    """Build one of the named plain schemes (w8a8, w8a8-dynamic, w8a16, w4a16, w4a8, w4a4).

    Raises:
        ValueError: unknown scheme name or an option the scheme does not take.
    """
    if name == "w8a8":
        _no_group(name, group_size)
        return LinearQuantScheme(name, _w(8, True, -1), TensorQuantSpec(8, False, "tensor"))
    if name == "w8a8-dynamic":
        _no_group(name, group_size)
        act = TensorQuantSpec(8, True, "token", dynamic=True)
        return LinearQuantScheme(name, _w(8, True, -1), act)
    if name == "w8a16":
        return LinearQuantScheme(name, _w(8, True if symmetric is None else symmetric, group_size))
    if name == "w4a16":
        return LinearQuantScheme(name, _w(4, False if symmetric is None else symmetric, group_size))
    if name == "w4a8":
        _no_group(name, group_size)
        act = TensorQuantSpec(8, True, "token", dynamic=True)
        return LinearQuantScheme(name, _w(4, True, -1), act)
    if name == "w4a4":
        _no_group(name, group_size)
        act = TensorQuantSpec(4, True, "token", dynamic=True)
        return LinearQuantScheme(name, _w(4, True, -1), act)
    raise ValueError(f"unknown quantization scheme {name!r}; expected one of {', '.join(SCHEMES)}")


def _no_group(name: str, group_size: int) -> None:
    if group_size > 0:
        raise ValueError(
            f"scheme {name!r} quantizes weights per channel; group-size is not supported"
        )



@dataclass(frozen=True)
class QuantTarget:
    """The scheme a run quantizes to, as the passes before the quantizer set themselves up for it.

    Attributes:
        scheme_name: one of `SCHEMES`.
        group_size: the requested weight group size, None for the scheme's default.
        symmetric: True when symmetric weights are requested, False for the scheme's default.
    """

    scheme_name: str
    group_size: int | None = None
    symmetric: bool = False

    @property
    def scheme(self) -> LinearQuantScheme:
        """The scheme with its default weight layout (bits and symmetry; group size unchecked)."""
        return make_scheme(self.scheme_name)

    @property
    def weight_symmetric(self) -> bool:
        """Whether the quantized weights will be symmetric."""
        return self.symmetric or self.scheme.weight.symmetric

    @property
    def activation_quant(self) -> Literal["none", "per-tensor", "per-token"]:
        """How the scheme quantizes linear inputs: not at all, static per tensor, or per token."""
        act = self.scheme.activation
        if act is None:
            return "none"
        return "per-token" if act.dynamic else "per-tensor"
