"""FOD: the I2Correlation transformer, one per feature level.

Reads top to bottom: positional embedding, token embedding, attention with a learnable
RBF target, the I2Correlation encoder layer, the per-level model, the two-level model,
and the factory. Losses and scoring math live in ``fod_core.losses``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fod_core.config import LevelConfig, ModelConfig, ReferenceMode
from fod_core.kernels import attention_divergence, divergence, outer_target
from fod_core.retrieval import RetrievalFeatures, retrieval_features, window_min_distance

# Bytes of one layer's inter attention map per scoring pass (see FODLevel.scoring_chunk).
SCORING_MAP_BUDGET = 64 << 20


def sincos_position_embedding_2d(d_model: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin/cos embedding (H*W, d): first half encodes the column, second the row."""
    if d_model % 4:
        raise ValueError(f"d_model must be divisible by 4, got {d_model}")
    quarter = d_model // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class Embedding2D(nn.Module):
    """1x1 projection of feature tokens plus the fixed 2-D position embedding."""

    def __init__(self, *, in_channels: int, d_model: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, d_model, bias=True)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        nn.init.zeros_(self.proj.bias)
        self.register_buffer(
            "position", sincos_position_embedding_2d(d_model, *grid), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens) + self.position


def squash_sigma(raw: torch.Tensor) -> torch.Tensor:
    """sigma = 3^(sigmoid(5 s) + 1e-5) - 1: a width in grid cells, in (0, 2)."""
    return torch.pow(3.0, torch.sigmoid(5.0 * raw) + 1e-5) - 1.0


def rbf_target_factors(
    sigma: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors of the row-normalised anisotropic RBF target.

    sigma: (N, heads, L, 2) as (sigma_y, sigma_x), L = H*W query cells. The Gaussian
    1/(2 pi sy sx) exp(-dy^2/2sy^2 - dx^2/2sx^2) factorises over rows and columns, and
    so does its row sum, so the normalised target is T = outer(ty, tx) with
    ty = softmax(-dy^2/2sy^2) over the H rows and tx likewise over the W columns.
    Returns ty (N, heads, L, H) and tx (N, heads, L, W).
    """
    height, width = grid
    sigma = sigma.float()
    rows = torch.arange(height, device=sigma.device, dtype=torch.float32)
    cols = torch.arange(width, device=sigma.device, dtype=torch.float32)
    dy2 = (rows.repeat_interleave(width)[:, None] - rows[None]) ** 2  # (L, H)
    dx2 = (cols.repeat(height)[:, None] - cols[None]) ** 2  # (L, W)
    ty = torch.softmax(-dy2 / (2 * sigma[..., 0:1] ** 2), dim=-1)
    tx = torch.softmax(-dx2 / (2 * sigma[..., 1:2] ** 2), dim=-1)
    return ty, tx


def rbf_target_dense(sigma: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The target computed the straightforward way, (N, heads, L, L): the reference's
    formula, kept for the baseline benchmark and to check the factorised form."""
    height, width = grid
    sigma = sigma.float()
    rows = torch.arange(height, device=sigma.device).repeat_interleave(width).float()
    cols = torch.arange(width, device=sigma.device).repeat(height).float()
    dy2 = (rows[:, None] - rows[None]) ** 2  # (L, L)
    dx2 = (cols[:, None] - cols[None]) ** 2
    sy, sx = sigma[..., 0:1], sigma[..., 1:2]  # (N, h, L, 1)
    dense = torch.exp(-dy2 / (2 * sy**2) - dx2 / (2 * sx**2)) / (2 * math.pi * sy * sx)
    return dense / dense.sum(dim=-1, keepdim=True)


@dataclass
class AttentionMaps:
    """One attention's learned correlation S (N, heads, L, L_keys) and its target.

    The target is kept as its separable factors; ``target`` materialises it.
    """

    correlation: torch.Tensor | None  # None when only ``terms`` were kept (lean training)
    sigma: torch.Tensor  # (N, heads, L, 2)
    target_rows: torch.Tensor  # (N, heads, L, H)
    target_cols: torch.Tensor  # (N, heads, L, W)
    # Per query row (N, heads, L): D(T, sg S), D(sg T, S) and E(S), computed with the map
    # block by block when the map itself is not kept.
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def target(self) -> torch.Tensor:
        return outer_target(self.target_rows, self.target_cols)


class PriorAttention(nn.Module):
    """Multi-head attention that also predicts a per-token RBF target for its map."""

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        grid: tuple[int, int],
        output_projection: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.grid = grid
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.sigma = nn.Linear(d_model, 2 * n_heads)
        self.out = nn.Linear(d_model, d_model) if output_projection else nn.Identity()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values (N or 1, heads, L_keys, d_head)."""
        return self._split_heads(self.key(context)), self._split_heads(self.value(context))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_maps: bool = True,
        lean_eps: float | None = None,
    ) -> tuple[torch.Tensor, AttentionMaps | None]:
        """Output and maps. ``keys_values`` of batch 1 (the class reference) broadcast over
        the batch. ``need_maps=False`` (scoring's intra branch, whose maps the score does
        not use) runs fused attention that never materialises S. ``lean_eps`` (training
        in fp32): the maps carry the loss's per-row terms instead of S, computed in
        blocks of query rows, so that S is never held whole."""
        n, length, d_model = x.shape
        q = self._split_heads(self.query(x) * self.head_dim**-0.5)  # scale L*d, not L*L
        k, v = keys_values if keys_values is not None else self.keys_values(context)
        if not need_maps:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
            return self.out(out.transpose(1, 2).reshape(n, length, d_model)), None
        if lean_eps is not None and not torch.is_autocast_enabled(x.device.type):
            sigma = squash_sigma(self.sigma(x).float()).view(n, length, self.n_heads, 2)
            sigma = sigma.transpose(1, 2)
            rows, cols = rbf_target_factors(sigma, self.grid)
            out, *terms = attention_divergence(q, k, v, rows, cols, lean_eps)
            out = out.transpose(1, 2).reshape(n, length, d_model)
            return self.out(out), AttentionMaps(None, sigma, rows, cols, tuple(terms))
        logits = q @ k.transpose(-2, -1)
        correlation = torch.softmax(logits.float(), dim=-1)
        out = (correlation.to(v.dtype) @ v).transpose(1, 2).reshape(n, length, d_model)
        sigma = squash_sigma(self.sigma(x).float()).view(n, length, self.n_heads, 2)
        sigma = sigma.transpose(1, 2)
        rows, cols = rbf_target_factors(sigma, self.grid)
        return self.out(out), AttentionMaps(correlation, sigma, rows, cols)


class I2CorrelationLayer(nn.Module):
    """Intra- and inter-correlation attention fused by their difference, then an FFN."""

    def __init__(
        self, *, config: LevelConfig, grid: tuple[int, int], output_projection: bool = False
    ) -> None:
        super().__init__()
        d_model = config.d_model
        attention = dict(
            d_model=d_model, n_heads=config.n_heads, grid=grid, output_projection=output_projection
        )
        self.intra = PriorAttention(**attention)
        self.inter = PriorAttention(**attention)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, config.ffn_ratio * d_model),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_ratio * d_model, d_model),
            nn.Dropout(config.dropout),
        )
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        reference_keys_values: tuple[torch.Tensor, torch.Tensor],
        *,
        need_intra_maps: bool = True,
        need_inter_maps: bool = True,
        lean_eps: float | None = None,
    ) -> tuple[torch.Tensor, AttentionMaps | None, AttentionMaps | None]:
        intra_out, intra_maps = self.intra(x, x, need_maps=need_intra_maps, lean_eps=lean_eps)
        inter_out, inter_maps = self.inter(
            x, keys_values=reference_keys_values, need_maps=need_inter_maps, lean_eps=lean_eps
        )
        # (x + intra) - (x + inter): the residual cancels, only the discrepancy remains.
        h = self.norm1(intra_out - inter_out)
        return self.norm2(h + self.ffn(h)), intra_maps, inter_maps


@dataclass
class LevelOutput:
    """What one level's forward pass yields for the loss and for scoring."""

    tokens: torch.Tensor  # (N, L, C) input feature tokens, the reconstruction target
    reconstruction: torch.Tensor  # (N, L, C)
    intra: list[AttentionMaps]  # empty when scoring: the score uses the inter maps only
    inter: list[AttentionMaps]  # empty for the reconstruction alone (the validation loss)


class FODLevel(nn.Module):
    """The FOD transformer for one feature level, holding its class reference features
    and, with ``reference_bank``, every training normal's (for nearest-normal references)."""

    def __init__(
        self,
        *,
        in_channels: int,
        grid: tuple[int, int],
        config: LevelConfig,
        output_projection: bool = False,
        reference_bank: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.in_channels = in_channels
        self.embed = Embedding2D(in_channels=in_channels, d_model=config.d_model, grid=grid)
        self.reference_embed = Embedding2D(
            in_channels=in_channels, d_model=config.d_model, grid=grid
        )
        self.layers = nn.ModuleList(
            I2CorrelationLayer(config=config, grid=grid, output_projection=output_projection)
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, in_channels)
        self.register_buffer("reference", torch.zeros(grid[0] * grid[1], in_channels))
        if reference_bank:  # (M, L, C): its size is the training set's, set by set_bank
            self.register_buffer("bank", torch.zeros(0, grid[0] * grid[1], in_channels))
        self._reference_cache: tuple[tuple, list] | None = None

    def set_reference(self, reference: torch.Tensor) -> None:
        """Per-position mean of the class's normal features, (L, C)."""
        self.reference.copy_(reference.to(self.reference))

    def set_bank(self, feature_maps: torch.Tensor) -> None:
        """The training normals' pooled features (M, C, H, W), kept as tokens (M, L, C)."""
        tokens = feature_maps.float().flatten(2).transpose(1, 2).contiguous()
        self.bank = tokens.to(self.reference.device)

    def nearest_reference(self, neighbours: torch.Tensor) -> torch.Tensor:
        """(N, K) bank rows -> each image's reference (N, L, C), the mean of its K rows."""
        k = neighbours.shape[1]
        rows = self.bank.index_select(0, neighbours.reshape(-1))
        return rows.view(-1, k, *self.bank.shape[1:]).mean(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """The bank's size is the training set's: take it from the saved tensor."""
        saved = state_dict.get(prefix + "bank")
        if saved is not None and hasattr(self, "bank"):
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reference_keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's inter keys and values of the reference tokens, batch 1.

        They depend on weights and the reference only, not on the input: computed once
        per forward pass (not once per image), and without gradients kept across calls
        until a weight, the reference, the device or autocast changes."""

        def compute():
            reference = self.reference_embed(self.reference)[None]
            return [layer.inter.keys_values(reference) for layer in self.layers]

        if torch.is_grad_enabled():
            return compute()
        inputs = [self.reference, *self.reference_embed.parameters()]
        inputs += [
            p
            for layer in self.layers
            for p in (*layer.inter.key.parameters(), *layer.inter.value.parameters())
        ]
        key = (
            tuple((id(t), t._version, t.device, t.dtype) for t in inputs),
            torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"),
        )
        if self._reference_cache is None or self._reference_cache[0] != key:
            self._reference_cache = (key, compute())
        return self._reference_cache[1]

    def scoring_chunk(self, device: torch.device) -> int:
        """Images per scoring pass on CPU: as many as keep one layer's inter map (heads x
        L x L, fp32) within ``SCORING_MAP_BUDGET``. At 1024 tokens a map is 32 MB per
        image; a batch of 16 in one pass streams 512 MB per op through memory and costs
        more per image than batch 1. A GPU takes the whole batch (it needs it to be busy)."""
        if device.type != "cpu":
            return 1 << 30
        length = self.grid[0] * self.grid[1]
        per_image = self.layers[0].inter.n_heads * length * length * 4
        return max(1, SCORING_MAP_BUDGET // per_image)

    def image_reference_keys_values(
        self, reference: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's inter keys and values of one reference per image, (N, L, C) pooled
        features (``ReferenceMode.NEAREST``: the mean of the normals nearest to each)."""
        embedded = self.reference_embed(reference)
        return [layer.inter.keys_values(embedded) for layer in self.layers]

    def forward(
        self,
        feature_map: torch.Tensor,
        *,
        scoring: bool = False,
        reconstruction_only: bool = False,
        lean_eps: float | None = None,
        reference: torch.Tensor | None = None,
    ) -> LevelOutput:
        """feature_map: pooled backbone features (N, C, H, W). ``lean_eps``: see
        ``PriorAttention.forward``. ``reference``: (N, L, C), one per image, instead of
        the class reference. ``reconstruction_only``: no maps at all, every attention
        fused (the validation loss needs the reconstruction alone, and whole maps of a
        batch are gigabytes)."""
        tokens = feature_map.flatten(2).transpose(1, 2)  # row-major (N, H*W, C)
        x = self.embed(tokens)
        intra, inter = [], []
        references = (
            self.reference_keys_values()
            if reference is None
            else self.image_reference_keys_values(reference)
        )
        for layer, keys_values in zip(self.layers, references, strict=True):
            x, intra_maps, inter_maps = layer(
                x,
                keys_values,
                need_intra_maps=not (scoring or reconstruction_only),
                need_inter_maps=not reconstruction_only,
                lean_eps=lean_eps,
            )
            if intra_maps is not None:
                intra.append(intra_maps)
            if inter_maps is not None:
                inter.append(inter_maps)
        reconstruction = self.head(self.norm(x))
        return LevelOutput(tokens, reconstruction.float(), intra, inter)

    @staticmethod
    def reconstruction_error(output: LevelOutput) -> torch.Tensor:
        """Per-token squared error plus cosine distance (N, L), the score's first part."""
        target, recon = output.tokens.float(), output.reconstruction.float()
        return ((target - recon) ** 2).mean(-1) + 1 - F.cosine_similarity(target, recon, dim=-1)

    @staticmethod
    def mean_divergence(maps: Sequence[AttentionMaps], log_eps: float) -> torch.Tensor:
        """Per-token divergence between S and its target, over heads and layers (N, L)."""
        divergences = [
            divergence(m.target_rows, m.target_cols, m.correlation, log_eps).mean(1) for m in maps
        ]
        return torch.stack(divergences).mean(0)

    @staticmethod
    def token_scores(output: LevelOutput, log_eps: float) -> torch.Tensor:
        """Per-token anomaly score (N, L): reconstruction error weighted by inter-discrepancy."""
        corr = FODLevel.mean_divergence(output.inter, log_eps)
        weights = torch.softmax(-corr, dim=-1)
        weights = weights.max(dim=-1, keepdim=True).values - weights
        return FODLevel.reconstruction_error(output) * weights


def class_references(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-position mean of the normal training features, (H*W, C) per level."""
    return [f.float().mean(0).flatten(1).transpose(0, 1).contiguous() for f in features]


class FODModel(nn.Module):
    """Independent FOD transformers, one per backbone level."""

    def __init__(
        self,
        *,
        config: ModelConfig,
        in_channels: Sequence[int],
        strides: Sequence[int],
    ) -> None:
        super().__init__()
        self.config = config
        grids = [(config.image_size // s, config.image_size // s) for s in strides]
        self.levels = nn.ModuleList(
            FODLevel(
                in_channels=c,
                grid=g,
                config=level,
                output_projection=config.output_projection,
                reference_bank=config.reference is ReferenceMode.NEAREST,
            )
            for c, g, level in zip(in_channels, grids, config.levels, strict=True)
        )

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [level.grid for level in self.levels]

    @property
    def retrieval_branches(self) -> tuple[RetrievalFeatures, ...]:
        """What each retrieval branch compares, in the score's order (none without one)."""
        if not self.config.retrieval_window:
            return ()
        return self.config.retrieval_features.branches()

    @property
    def n_branches(self) -> int:
        """Maps that make the anomaly map: one per level, then the retrieval distances'."""
        return len(self.levels) + len(self.retrieval_branches)

    @property
    def nearest(self) -> bool:
        """Whether each image's reference is the mean of its nearest training normals."""
        return self.config.reference is ReferenceMode.NEAREST

    def set_references(self, references: Sequence[torch.Tensor]) -> None:
        for level, reference in zip(self.levels, references, strict=True):
            level.set_reference(reference)

    def fit_references(self, feature_maps: Sequence[torch.Tensor]) -> None:
        """From the normal training images' features (per level (M, C, H, W)): the class
        reference, and for NEAREST the bank the per-image references are drawn from."""
        self.set_references(class_references(feature_maps))
        if self.nearest:
            for level, features in zip(self.levels, feature_maps, strict=True):
                level.set_bank(features)

    def neighbours(
        self, feature_maps: Sequence[torch.Tensor], *, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, K) bank rows nearest to each image: squared distance between the finer
        level's whole feature maps. ``exclude`` (N,): each image's own row, for training
        images, whose reference must come from other normals."""
        bank = self.levels[0].bank.flatten(1)  # (M, L * C)
        if bank.shape[0] == 0:
            raise RuntimeError("the nearest-normal reference has no bank: call fit_references")
        queries = feature_maps[0].float().flatten(2).transpose(1, 2).flatten(1)
        # fp32 even under bf16 autocast: |q|^2 - 2 q.b + |b|^2 cancels, and bf16's round-off
        # there is larger than the gaps between neighbours.
        with torch.autocast(queries.device.type, enabled=False):
            distances = (
                queries.pow(2).sum(1, keepdim=True)
                - 2.0 * queries @ bank.transpose(0, 1)
                + bank.pow(2).sum(1)[None]
            )
        if exclude is not None:
            distances = distances.scatter(1, exclude[:, None].to(distances.device), float("inf"))
        k = min(self.config.reference_k, bank.shape[0] - (exclude is not None))
        if k < 1:
            raise ValueError("a nearest-normal reference needs at least 2 training images")
        return distances.topk(k, dim=1, largest=False).indices

    def image_references(
        self, feature_maps: Sequence[torch.Tensor], neighbours: torch.Tensor | None = None
    ) -> list[torch.Tensor | None]:
        """Per level each image's reference (N, L, C), or None for the class reference."""
        if not self.nearest:
            return [None] * len(self.levels)
        if neighbours is None:
            neighbours = self.neighbours(feature_maps)
        return [level.nearest_reference(neighbours) for level in self.levels]

    def retrieval_map(
        self,
        feature_maps: Sequence[torch.Tensor],
        neighbours: torch.Tensor | None = None,
        kind: RetrievalFeatures | None = None,
    ) -> torch.Tensor:
        """(N, H, W) on the finer level's grid: the retrieval distance (``fod_core.retrieval``)
        to each image's K nearest bank rows, or to the class reference, compared on ``kind``
        (default: the ``retrieval_features`` the config names, if it names one branch)."""
        kind = RetrievalFeatures(kind or self.config.retrieval_features)
        if kind is RetrievalFeatures.BOTH:
            raise ValueError("a model with both retrieval branches computes one kind at a time")
        levels = self.levels if kind is RetrievalFeatures.LOCAL else self.levels[:1]
        if self.nearest and neighbours is None:
            neighbours = self.neighbours(feature_maps)
        row_maps = []
        for level in levels:
            if self.nearest:
                tokens = level.bank.index_select(0, neighbours.reshape(-1))  # (N K, L, C)
            else:
                tokens = level.reference[None]  # (1, L, C)
            # shape[0], not len(): len() is a Python int, which fixes an exported graph's batch
            row_maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *level.grid))
        n_rows = neighbours.shape if self.nearest else (1, 1)
        with torch.autocast(feature_maps[0].device.type, enabled=False):
            features = retrieval_features(feature_maps[: len(levels)], kind)
            rows = retrieval_features(row_maps, kind)
            return window_min_distance(
                features, rows.view(*n_rows, *rows.shape[1:]), self.config.retrieval_window
            )

    def forward(
        self,
        feature_maps: Sequence[torch.Tensor],
        *,
        lean: bool = False,
        neighbours: torch.Tensor | None = None,
        reconstruction_only: bool = False,
    ) -> list[LevelOutput]:
        """``lean`` (training): the maps carry the loss's per-row terms, S is never held
        whole (fp32 only; under autocast the maps are kept as before). ``neighbours``
        (NEAREST): each image's bank rows, found by retrieval when not given.
        ``reconstruction_only``: no attention maps (see ``FODLevel.forward``)."""
        eps = self.config.log_eps if lean else None
        references = self.image_references(feature_maps, neighbours)
        return [
            level(f, lean_eps=eps, reference=r, reconstruction_only=reconstruction_only)
            for level, f, r in zip(self.levels, feature_maps, references, strict=True)
        ]

    @torch.no_grad()
    def score_maps(
        self,
        feature_maps: Sequence[torch.Tensor],
        *,
        levels: Sequence[bool] | None = None,
        chunked: bool = True,
    ) -> list[torch.Tensor | None]:
        """Per-level token score grids [(N, H_l, W_l)], then each retrieval branch's where
        the model has one (``n_branches`` in all); post-processing makes the map.
        ``levels`` picks which to compute (the others are None): a branch weighted 0 is
        not run at all. ``chunked``: in passes of ``scoring_chunk`` images (an exported
        graph, whose batch size is not known when it is traced, takes one pass)."""
        maps: list[torch.Tensor | None] = []
        wanted = list(levels) if levels is not None else [True] * self.n_branches
        if len(wanted) != self.n_branches:
            raise ValueError(f"{len(wanted)} branches asked of a model with {self.n_branches}")
        neighbours = self.neighbours(feature_maps) if self.nearest else None
        n_levels = len(self.levels)
        retrieval = [
            self.retrieval_map(feature_maps, neighbours, kind) if use else None
            for kind, use in zip(self.retrieval_branches, wanted[n_levels:], strict=True)
        ]
        wanted = wanted[:n_levels]
        for level, features, use in zip(self.levels, feature_maps, wanted, strict=True):
            if not use:
                maps.append(None)
                continue
            if chunked:
                size = level.scoring_chunk(features.device)
                chunks = list(features.split(size, dim=0))
                rows = [None] * len(chunks) if neighbours is None else neighbours.split(size)
            else:
                chunks, rows = [features], [neighbours]
            scores = [
                FODLevel.token_scores(
                    level(
                        chunk,
                        scoring=True,
                        reference=None if r is None else level.nearest_reference(r),
                    ),
                    self.config.log_eps,
                )
                for chunk, r in zip(chunks, rows, strict=True)
            ]
            maps.append(torch.cat(scores).view(-1, *level.grid))
        return maps + retrieval


def create_fod_model(
    config: ModelConfig, *, in_channels: Sequence[int], strides: Sequence[int]
) -> FODModel:
    for stride in strides:
        if config.image_size % stride:
            raise ValueError(f"image_size {config.image_size} is not a multiple of stride {stride}")
    return FODModel(config=config, in_channels=in_channels, strides=strides)
