"""What the machine can do and what FOD asks of it: the CPU's ISA, its measured matmul rate,
and FOD's FLOPs per image, so that every timing carries a fraction of the machine's limit.

An absolute time says little across machines (an AVX2 EPYC and an AMX Xeon differ by 3x
on the same model); "X GFLOP/s, Y% of this machine's matmul rate" compares.

FLOPs are matmul FLOPs (2 per multiply-add) of the projections, attentions and FFNs,
computed from the model's configuration and grids; the elementwise work (softmax, the
RBF target, divergences) is memory-bound and not counted. The backbone is counted by
PyTorch's FLOP counter on one image.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The ISA features that decide how fast a CPU multiplies matrices, in the order printed.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
MATMUL_SIZE = 2048


@dataclass(frozen=True)
class Machine:
    """The processor a timing was taken on."""

    device: str
    name: str
    isa: tuple[str, ...]
    threads: int

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware: AMX or AVX512-BF16 on a CPU; any CUDA GPU from Ampere."""
        if self.device.startswith("cuda"):
            return torch.cuda.is_bf16_supported()
        return "amx_bf16" in self.isa or "avx512_bf16" in self.isa

    def describe(self) -> str:
        if self.device.startswith("cuda"):
            return f"{self.name} ({self.device})"
        missing = [f for f in ("avx512f", "amx_bf16") if f not in self.isa]
        isa = " ".join(self.isa) or "none of " + ",".join(ISA_FLAGS)
        lacks = f"; no {', no '.join(missing)}" if missing else ""
        return f"{self.name}, {self.threads} threads, ISA {isa}{lacks}"


def machine(device: str | torch.device = "cpu") -> Machine:
    """The CPU (model name and ISA flags from /proc/cpuinfo) or the CUDA device."""
    device = str(device)
    if device.startswith("cuda"):
        return Machine(device, torch.cuda.get_device_name(torch.device(device)), (), 0)
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    isa = tuple(f for f in ISA_FLAGS if f in flags)
    return Machine(device, name, isa, torch.get_num_threads())


def matmul_gflops(
    dtype: torch.dtype = torch.float32,
    *,
    device: str | torch.device = "cpu",
    size: int = MATMUL_SIZE,
    seconds: float = 1.0,
) -> float:
    """The machine's own rate on a square matmul of ``size`` (best of repeated runs)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size**3

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    run()  # warm-up: allocation, kernel selection
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = min(best, run())
    return flops / best / 1e9


@dataclass(frozen=True)
class Rates:
    """The machine's measured matmul rates, GFLOP/s (bf16: None where it is not native)."""

    fp32: float
    bf16: float | None

    def peak(self, precision: str = "fp32") -> float:
        return self.bf16 if precision == "bf16" and self.bf16 else self.fp32


def measure_rates(where: Machine, *, seconds: float = 1.0) -> Rates:
    fp32 = matmul_gflops(torch.float32, device=where.device, seconds=seconds)
    bf16 = (
        matmul_gflops(torch.bfloat16, device=where.device, seconds=seconds)
        if where.native_bf16
        else None
    )
    return Rates(fp32, bf16)


# -- FOD's FLOPs ------------------------------------------------------------------------
@dataclass(frozen=True)
class FodFlops:
    """Matmul FLOPs per image: scoring (inference), and one training step's forward and
    backward (the class reference's projections, computed once per batch, included for
    the given batch size)."""

    backbone: float
    score: float
    train_step: float
    batch_size: int

    @property
    def inference(self) -> float:
        return self.backbone + self.score

    def to_dict(self) -> dict:
        return asdict(self) | {"inference": self.inference}


def level_flops(
    *,
    tokens: int,
    in_channels: int,
    d_model: int,
    n_heads: int,
    n_layers: int,
    ffn_ratio: int,
    output_projection: bool = False,
    training: bool = False,
) -> tuple[float, float]:
    """(per image, per batch) matmul FLOPs of one level's forward pass. Per batch: the
    reference tokens' embedding and inter keys and values (they depend on no image)."""
    n, c, d = tokens, in_channels, d_model
    projection = 2.0 * n * d * d
    attention = 4.0 * n * n * d  # logits (L x L x d) and weights x values
    sigma = 2.0 * n * d * 2 * n_heads
    out = projection if output_projection else 0.0
    intra = 3 * projection + attention + out + (sigma if training else 0.0)
    inter = projection + attention + sigma + out
    ffn = 2 * 2.0 * n * d * ffn_ratio * d
    per_image = 2.0 * n * c * d + n_layers * (intra + inter + ffn) + 2.0 * n * d * c
    per_batch = 2.0 * n * c * d + n_layers * 2 * projection
    return per_image, per_batch


def fod_flops(
    model, backbone=None, *, batch_size: int = 8, levels: Sequence[bool] | None = None
) -> FodFlops:
    """FLOPs of ``model`` (an ``FODModel``) per image; ``backbone`` (a ``FeatureExtractor``)
    is counted by PyTorch's FLOP counter on one image of the model's size. ``levels``: the
    levels scoring runs (``PostProcessing.used_levels``: a level weighted 0 is skipped, and
    at 1024 tokens the first level is most of the cost); training runs them all."""
    score = train = 0.0
    config = model.config
    # the retrieval branches (after the levels, if any) are not counted: next to nothing on
    # the finer level at a small window, but local features at any position of K = 20 rows
    # are about 6 GFLOP an image at 256 px, the whole cost where FOD's levels weigh 0
    wanted = list(levels)[: len(model.levels)] if levels is not None else [True] * len(model.levels)
    for level, level_config, used in zip(model.levels, config.levels, wanted, strict=True):
        shape = dict(
            tokens=level.grid[0] * level.grid[1],
            in_channels=level.in_channels,
            d_model=level_config.d_model,
            n_heads=level_config.n_heads,
            n_layers=level_config.n_layers,
            ffn_ratio=level_config.ffn_ratio,
            output_projection=config.output_projection,
        )
        # The class reference's K, V are cached; a nearest-normal reference is one per image.
        per_image, per_batch = level_flops(**shape)
        score += (per_image + (per_batch if model.nearest else 0.0)) if used else 0.0
        per_image, per_batch = level_flops(**shape, training=True)
        shared = per_batch if model.nearest else per_batch / batch_size
        train += 3 * (per_image + shared)  # backward: about twice forward
    if model.nearest:  # retrieval: the finer level's whole map against each bank image
        bank = model.levels[0].bank
        score += 2.0 * bank.shape[0] * bank.shape[1] * bank.shape[2]
    backbone_flops = 0.0
    if backbone is not None:
        from torch.utils.flop_counter import FlopCounterMode

        image = torch.zeros(1, 3, config.image_size, config.image_size)
        parameter = next(backbone.parameters(), None)
        if parameter is not None:
            image = image.to(parameter.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            backbone(image)
        backbone_flops = float(counter.get_total_flops())
    return FodFlops(backbone_flops, score, train, batch_size)


def achieved(flops: float, seconds: float, peak_gflops: float) -> dict:
    """GFLOP/s reached and its share of the machine's matmul rate."""
    rate = flops / seconds / 1e9
    return {"gflops": round(rate, 1), "fraction_of_matmul": round(rate / peak_gflops, 3)}


def roofline_header(where: Machine, rates: Rates, flops: FodFlops | None = None) -> str:
    """The line a benchmark prints first: the machine, its rates, and the model's cost."""
    bf16 = f"{rates.bf16:.0f}" if rates.bf16 else "not native"
    line = (
        f"machine: {where.describe()} | matmul {MATMUL_SIZE}^2: fp32 {rates.fp32:.0f} GFLOP/s, "
        f"bf16 {bf16}"
    )
    if flops is not None:
        line += (
            f" | FOD per image: inference {flops.inference / 1e9:.2f} GFLOP "
            f"(backbone {flops.backbone / 1e9:.2f}), training step {flops.train_step / 1e9:.2f}"
            f" GFLOP at batch {flops.batch_size}"
        )
    return line
