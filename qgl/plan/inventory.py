"""The model's parameters as the optimizer sees them, and their bytes, from the config alone.

`inventory` builds the model on the meta device (no memory), applies the same surgery and
grouping as a run (`quantize_model`, `make_param_groups`) and lists every trainable parameter:
its shape, whether its weight is stored INT8 (a QLinear gradient carrier), whether it is a linear
weight (autocast casts it) and its GaLore rank. The byte functions below restate the storage
formats of docs/internals.md; the tests check them against built tensors, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from qgl.models.llama import LlamaConfig, LlamaForCausalLM
from qgl.optim.adam import BLOCK_8BIT, MIN_8BIT_SIZE, plain_chunk
from qgl.optim.settings import rank_fits
from qgl.plan.settings import PlanError, PlanSettings
from qgl.quant import blockwise8


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter. `shape` is the weight's (a QLinear carrier has the weight's shape)."""

    name: str
    shape: tuple[int, ...]
    int8: bool  # the weight lives in a QLinear's INT8 buffers
    linear: bool  # the weight of a linear layer (its input and, under autocast, itself get cast)
    rank: int | None  # GaLore rank; None: plain AdamW on the full gradient

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def low_shape(self) -> tuple[int, ...]:
        """Shape of the gradient Adam sees: (m, r) if m >= n (P on the right), (r, n) otherwise."""
        if self.rank is None:
            return self.shape
        m, n = self.shape
        return (m, self.rank) if m >= n else (self.rank, n)

    @property
    def basis_shape(self) -> tuple[int, int]:
        """Shape of P: (r, n) on the right, (m, r) on the left."""
        m, n = self.shape
        return (self.rank, n) if m >= n else (m, self.rank)

    @property
    def lead_numel(self) -> int:
        """Length of the fp32 leading singular vector the projector keeps (n right, m left)."""
        m, n = self.shape
        return n if m >= n else m


@dataclass(frozen=True)
class Inventory:
    params: tuple[ParamInfo, ...]
    buffer_numel: int  # floating buffers other than QLinear's (the RoPE cache), in elements
    update_order: tuple[int, ...] = ()  # indices into `params` in the order layer-wise updates run

    def in_update_order(self) -> list[ParamInfo]:
        """The parameters in the order their post-accumulate-grad hooks fire: the reverse of the
        model's registration order (the backward runs the forward's modules in reverse; checked by
        the tests on a built model)."""
        return [self.params[i] for i in self.update_order] if self.update_order else list(self.params)


def linear_shapes(config: LlamaConfig) -> list[tuple[str, tuple[int, int]]]:
    """(module name, weight shape) of every linear of `LlamaForCausalLM(config)`, from one block built on
    the meta device (fast: a 7B model's 32 blocks are not built)."""
    from qgl.models.llama import Block

    with torch.device("meta"):
        block = Block(replace(config, activation_checkpointing=False))
    inner = [(n, tuple(m.weight.shape)) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    shapes = [(f"blocks.{i}.{n}", shape) for i in range(config.num_layers) for n, shape in inner]
    if not config.tie_embeddings:  # a tied head's weight is the embedding's (never projected)
        shapes.append(("lm_head", (config.vocab_size, config.hidden_size)))
    return shapes


def galore_problem(config: LlamaConfig, rank: int, target_modules: Sequence[str],
                   exclude: Sequence[str]) -> tuple[str, str] | None:
    """(field, one line) if GaLore at `rank` cannot train `config` (no linear matched, or a rank larger
    than a projected matrix), as `make_param_groups` and `QGaLoreAdamW` would refuse; else None."""
    from qgl.optim.param_groups import _matches
    from qgl.optim.settings import SettingError, rank_fits

    shapes = linear_shapes(config)
    chosen = [(n, s) for n, s in shapes if _matches(n, target_modules) and not _matches(n, exclude)]
    if not chosen:
        return "target_modules", (f"no linear module matches target_modules={list(target_modules)} "
                                  f"(exclude={list(exclude)}); linear modules are e.g. "
                                  f"{[n for n, _ in shapes[:7]]}")
    name, shape = min(chosen, key=lambda c: min(c[1]))
    try:
        rank_fits(rank, shape, f"{name}.weight")
    except SettingError as e:
        return "rank", str(e)
    return None


def inventory(config: LlamaConfig, s: PlanSettings) -> Inventory:
    """Every trainable parameter of `LlamaForCausalLM(config)` after the run's surgery and grouping."""
    from qgl.nn import quantize_model
    from qgl.optim import make_param_groups

    with torch.device("meta"):
        model = LlamaForCausalLM(replace(config, activation_checkpointing=False))
    buffer_numel = sum(b.numel() for b in model.buffers())
    try:
        if s.qgalore and s.quantize_weights:
            quantize_model(model, target_modules=s.target_modules, exclude=s.exclude,
                           group_size=s.group_size, symmetric=s.symmetric)
        if s.qgalore:
            groups = make_param_groups(model, s.rank, s.target_modules, s.exclude)
        else:
            groups = [dict(params=list(model.parameters()), names=[n for n, _ in model.named_parameters()],
                           rank=None)]
        for g in groups:  # what QGaLoreAdamW refuses: a rank larger than a projected matrix
            for p, name in zip(g["params"], g["names"], strict=True):
                if g["rank"] is not None:
                    rank_fits(g["rank"], tuple(p.shape), name)
    except ValueError as e:
        raise PlanError(str(e).splitlines()[0]) from e
    linear = {f"{n}.weight" for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or hasattr(getattr(m, "weight", None), "_qgl_owner")}
    params = tuple(
        ParamInfo(name, tuple(p.shape), hasattr(p, "_qgl_owner"), name in linear, g["rank"])
        for g in groups for p, name in zip(g["params"], g["names"], strict=True)
    )
    index = {info.name: i for i, info in enumerate(params)}
    order = tuple(index[name] for name, _ in reversed(list(model.named_parameters())) if name in index)
    return Inventory(params, buffer_numel, order)


# ---------------------------------------------------------------- formats (bytes)
def int8_nbytes(numel: int, group_size: int = 256, symmetric: bool = True) -> int:
    """INT8 weight: numel int8 codes + fp32 scale (and, asymmetric, fp32 zero) per group."""
    return numel + 4 * math.ceil(numel / group_size) * (1 if symmetric else 2)


def moments_nbytes(numel: int, bits: int = 8, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Two Adam moments (`qgl.optim.adam.init_moments`): fp32 (8 B an element) when 32-bit or
    smaller than `min_8bit_size`; else uint8 codes + an fp32 absmax per 256 elements, each."""
    if bits == 32 or numel < min_8bit_size:
        return 8 * numel
    return 2 * (numel + 4 * math.ceil(numel / BLOCK_8BIT))


def projection_nbytes(p: ParamInfo, quantize: bool = True, group_size: int = 256,
                      float_bytes: int = 4) -> int:
    """GaLore projector: P in INT4 (ceil(k/2) packed bytes + fp32 scale and zero per group of its
    k elements) or as a float (`float_bytes` k: the gradient's dtype, 2 for 16-bit weights, else 4),
    plus the fp32 leading singular vector."""
    k = math.prod(p.basis_shape)
    stored = (k + 1) // 2 + 8 * math.ceil(k / group_size) if quantize else float_bytes * k
    return stored + 4 * p.lead_numel


def state_nbytes(p: ParamInfo, s: PlanSettings) -> tuple[int, int]:
    """(moments, projection) bytes of one parameter's optimizer state."""
    if not s.qgalore:  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
        return 2 * s.dtype_bytes[0] * p.numel, 0
    moments = moments_nbytes(math.prod(p.low_shape), s.optim_bits, s.min_8bit_size)
    if p.rank is None:
        return moments, 0
    float_bytes = 2 if s.dtype_bytes[0] == 2 else 4  # a float P is stored in its gradient's dtype
    return moments, projection_nbytes(p, s.proj_quant, s.proj_group_size, float_bytes)


def grad_nbytes(p: ParamInfo, s: PlanSettings) -> int:
    """A parameter's gradient while it is created: the parameter's dtype, plus, under autocast, the
    compute-dtype matmul result it is cast from (linear weights)."""
    pb, cb, autocast = s.dtype_bytes
    return p.numel * (pb + (cb if autocast and p.linear and cb != pb else 0))


def step_temp_nbytes(p: ParamInfo, s: PlanSettings) -> int:
    """Peak temporaries of QGaLoreAdamW's update of `p` (bytes; CUDA path: Triton INT8 update in place).

    copy = 4 numel if the gradient is not fp32 (`grad.float()`), else 0.
    Plain (`qgl.optim.adam.adam_step_`: in place, over chunks of c = min(numel, `plain_chunk()`)
    elements, one chunk's temporaries alive at a time): max(copy + Adam's, 4c + pb c for the fp32
    direction and its cast to a non-fp32 parameter dtype of pb bytes), copy and Adam's on c elements;
    the whole tensor's numel decides 8-bit or fp32 moments.
    Adam's (on N elements): fused 8-bit 4N (the fp32 zero "parameter" bitsandbytes writes the
    direction into); 8-bit reference 18N + 8 min(N, Q) (fp32 m, v, denominator and direction, both
    moments' new codes, and the quantizer's fp32 copy and int32 buckets of one chunk of Q =
    `qgl.quant.blockwise8` chunk elements), + a few bytes per 256-element block (absmax, min/max);
    fp32 moments 8N (sqrt(v) and its scaled copy, then denominator and direction).
    GaLore (m x n, k = min(m, n), L = low-rank numel): max of the refresh and the update.
    Refresh (full SVD): copy + 4 (2 m n + k^2): the input LAPACK/cuSOLVER overwrites, Vh (or U) and the
    k x k factor; randomized: copy + 16 (r + 8)(m + n) (sketch, QR and power-iteration blocks).
    Update (`QGaLoreAdamW._update_param`), the low-rank gradient (4L) alive throughout, plus the
    largest of: the projection (INT4 P: its dequantized 16-bit copy, 2P; a float P is stored in the
    gradient's dtype: nothing); Adam's on L; the back-projection: direction and its scaled copy (8L),
    then for an INT8 weight the low side's 16-bit cast (2L), INT4 P's 16-bit copy (2P) and the bf16
    (m, n) update (consumed in place by the INT8 update); for a float weight (`add_back_`: one
    addmm_ into the weight, no (m, n) temporary) the low side's cast to a 16-bit weight's dtype
    (pb L) and an INT4 P's copy in it (pb P).
    """
    pb = s.dtype_bytes[0]
    n = p.numel
    copy = 4 * n if pb != 4 else 0

    def adam(numel: int, work: int) -> int:  # `work` elements of a tensor of `numel` (8-bit or not)
        if s.optim_bits == 32 or numel < s.min_8bit_size:
            return 8 * work
        return 4 * work if s.fused_8bit else 18 * work + 8 * min(work, blockwise8._CHUNK)

    if p.rank is None:
        c = min(n, plain_chunk())
        return max((4 * c if pb != 4 else 0) + adam(n, c), (4 + pb) * c if pb != 4 else 0)
    k = min(p.shape)
    if s.svd_method == "full":
        refresh = copy + 4 * (2 * n + k * k)
    else:
        refresh = copy + 16 * (p.rank + 8) * (p.shape[0] + p.shape[1])
    low = math.prod(p.low_shape)
    basis = math.prod(p.basis_shape)
    mm16 = s.proj_quant or pb != 4  # the products run on 16-bit operands (projector.py)
    p16 = 2 * basis if s.proj_quant else 0  # INT4 P decoded once, alive over the update (projector.decoded)
    if p.int8:
        back = 8 * low + (2 * low if mm16 else 0) + 2 * n
    else:  # add_back_ multiplies in the weight's dtype: the shared bf16 decoding, else its own
        back = 8 * low + (pb * low if pb != 4 else 0) + (pb * basis if s.proj_quant and pb != 2 else 0)
    update = 4 * low + p16 + max(adam(low, low), back)
    return max(refresh, update)
