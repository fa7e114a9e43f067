"""The FOD model and objective: shapes, the RBF target, KL/entropy, phase isolation."""

from __future__ import annotations

import math

import pytest
import torch

from fod_core.config import LevelConfig, ModelConfig, TrainConfig
from fod_core.kernels import divergence, outer_target, split_divergence_entropy
from fod_core.losses import (
    entropy,
    fod_objective,
    kl_divergence,
    reconstruction_loss,
    total_objective,
)
from fod_core.model import (
    FODLevel,
    create_fod_model,
    rbf_target_dense,
    rbf_target_factors,
    sincos_position_embedding_2d,
    squash_sigma,
)
from fod_core.trainer import FODTrainer

CHANNELS, STRIDES = (12, 20), (8, 16)


def small_config(n_layers: int = 2, image_size: int = 64) -> ModelConfig:
    return ModelConfig(
        image_size=image_size,
        levels=(
            LevelConfig(d_model=32, n_heads=4, n_layers=n_layers),
            LevelConfig(d_model=48, n_heads=4, n_layers=n_layers),
        ),
    )


def features(batch: int, image_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, image_size // s, image_size // s, generator=g)
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]


def make_model(n_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = create_fod_model(small_config(n_layers), in_channels=CHANNELS, strides=STRIDES)
    model.set_references([f.mean(0).flatten(1).T for f in features(4, seed=99)])
    return model


def test_default_config_is_the_method():
    config = ModelConfig()
    assert config.image_size == 256
    assert [(lv.d_model, lv.n_heads, lv.n_layers, lv.ffn_ratio) for lv in config.levels] == [
        (256, 8, 3, 4),
        (512, 8, 3, 4),
    ]
    assert config.backbone.out_indices == (2, 3)
    assert (config.lambda1, config.lambda2, config.score_sigma) == (0.5, 0.5, 4.0)
    assert config.output_projection is False


def test_forward_shapes():
    model = make_model()
    outputs = model(features(3))
    assert len(outputs) == 2
    for out, c, s in zip(outputs, CHANNELS, STRIDES, strict=True):
        length = (64 // s) ** 2
        assert out.reconstruction.shape == (3, length, c)
        assert out.tokens.shape == (3, length, c)
        assert len(out.intra) == len(out.inter) == 2
        assert out.intra[0].correlation.shape == (3, 4, length, length)
        assert out.inter[0].target.shape == (3, 4, length, length)
    maps = model.score_maps(features(3))
    assert [tuple(m.shape) for m in maps] == [(3, 8, 8), (3, 4, 4)]


def test_sincos_embedding_halves_encode_column_then_row():
    emb = sincos_position_embedding_2d(16, 3, 5)
    assert emb.shape == (15, 16)
    grid = emb.view(3, 5, 16)
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])  # column half ignores the row
    assert torch.allclose(grid[:, 0, 8:], grid[:, 4, 8:])  # row half ignores the column
    assert not torch.allclose(grid[0, 0, :8], grid[0, 1, :8])
    with pytest.raises(ValueError):
        sincos_position_embedding_2d(18, 2, 2)


def test_sigma_squash_range():
    raw = torch.tensor([-100.0, 0.0, 100.0])
    sigma = squash_sigma(raw)
    assert sigma[0] == pytest.approx(3**1e-5 - 1, abs=1e-6)
    assert sigma[1] == pytest.approx(3 ** (0.5 + 1e-5) - 1, rel=1e-5)
    assert sigma[2] == pytest.approx(2.0, rel=1e-4)


def test_rbf_rows_sum_to_one_and_match_the_dense_formula():
    torch.manual_seed(0)
    sigma = squash_sigma(torch.randn(2, 3, 20, 2))
    rows, cols = rbf_target_factors(sigma, (4, 5))
    target = outer_target(rows, cols)
    assert target.shape == (2, 3, 20, 20)
    assert torch.allclose(target.sum(-1), torch.ones(2, 3, 20), atol=1e-6)
    assert torch.allclose(target, rbf_target_dense(sigma, (4, 5)), atol=1e-6)
    # The peak of each row sits on the query cell itself.
    assert torch.equal(target.argmax(-1)[0, 0], torch.arange(20))


def test_rbf_dense_value_by_hand():
    sigma = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2).expand(1, 1, 4, 2)
    dense = rbf_target_dense(sigma, (2, 2))
    # query cell (0,0): offsets (dy,dx) to cells (0,0),(0,1),(1,0),(1,1)
    raw = torch.tensor(
        [math.exp(-(dy**2) / 2 - dx**2 / 8) for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    )
    assert torch.allclose(dense[0, 0, 0], raw / raw.sum(), atol=1e-6)


def test_kl_and_entropy_known_values():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    eps = 1e-4
    expected = 0.5 * (math.log(0.5 + eps) - math.log(0.25 + eps)) + 0.5 * (
        math.log(0.5 + eps) - math.log(0.75 + eps)
    )
    assert float(kl_divergence(p, q, eps)) == pytest.approx(expected, rel=1e-6)
    assert float(kl_divergence(p, p, eps)) == 0.0
    assert float(entropy(torch.tensor([0.25] * 4), eps)) == pytest.approx(
        -math.log(0.25 + eps), rel=1e-6
    )
    assert float(entropy(torch.tensor([1.0, 0.0]), eps)) == pytest.approx(
        -math.log(1 + eps), abs=1e-7
    )


def test_fused_divergence_matches_autograd_of_the_definition():
    """Values and both stop-gradient halves against plain autograd on the KL formula."""
    torch.manual_seed(0)
    raw_sigma = torch.randn(2, 3, 12, 2, dtype=torch.float64)
    logits = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    eps = 1e-4

    def inputs():
        s = raw_sigma.clone().requires_grad_()
        lg = logits.clone().requires_grad_()
        rows, cols = rbf_target_factors(squash_sigma(s), (3, 4))
        return s, lg, rows.double(), cols.double(), torch.softmax(lg, -1)

    s1, l1, rows, cols, corr = inputs()
    div_t, div_s, ent = split_divergence_entropy(rows, cols, corr, eps)
    (2.0 * div_t.sum() + 3.0 * div_s.sum() - 0.7 * ent.sum()).backward()

    s2, l2, rows2, cols2, corr2 = inputs()
    target = outer_target(rows2, cols2)
    sym_t = kl_divergence(target, corr2.detach(), eps) + kl_divergence(corr2.detach(), target, eps)
    sym_s = kl_divergence(target.detach(), corr2, eps) + kl_divergence(corr2, target.detach(), eps)
    (2.0 * sym_t.sum() + 3.0 * sym_s.sum() - 0.7 * entropy(corr2, eps).sum()).backward()

    assert torch.allclose(div_t, sym_t.float(), atol=1e-5)
    assert torch.allclose(div_s, div_t)
    assert torch.allclose(ent, entropy(corr2, eps).float(), atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(l1.grad, l2.grad, rtol=1e-4, atol=1e-6)


def test_scoring_divergence_is_the_training_divergence():
    """Scoring's one-logarithm form, sum (T-S) log((T+e)/(S+e)), is the same D."""
    torch.manual_seed(1)
    rows, cols = rbf_target_factors(squash_sigma(torch.randn(2, 3, 20, 2)), (4, 5))
    corr = torch.softmax(4 * torch.randn(2, 3, 20, 20), -1)  # sharp rows: tiny S values
    target = outer_target(rows, cols)
    by_definition = kl_divergence(target, corr, 1e-4) + kl_divergence(corr, target, 1e-4)
    scored = divergence(rows, cols, corr, 1e-4)
    assert scored.shape == (2, 3, 20)
    assert torch.allclose(scored, by_definition, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scored, split_divergence_entropy(rows, cols, corr, 1e-4)[0], rtol=1e-5)


def _grads(model, loss) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        n: float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for n, p in model.named_parameters()
    }


def test_each_phase_moves_only_its_parameters():
    """Without the shared reconstruction term, phase 1 reaches the sigma heads and not the
    attention's query/key, phase 2 the query/key and not the sigma heads."""
    model = make_model(n_layers=1)
    out = model(features(2))[0]
    terms = fod_objective(out, lambda1=0.5, lambda2=0.5, eps=1e-4)
    phase1 = _grads(model, terms.phase1 - terms.reconstruction)
    phase2 = _grads(model, terms.phase2 - terms.reconstruction)
    layer = "levels.0.layers.0"
    for branch in ("intra", "inter"):
        assert phase1[f"{layer}.{branch}.sigma.weight"] > 0
        assert phase1[f"{layer}.{branch}.query.weight"] == 0
        assert phase1[f"{layer}.{branch}.key.weight"] == 0
        assert phase2[f"{layer}.{branch}.query.weight"] > 0
        assert phase2[f"{layer}.{branch}.key.weight"] > 0
        assert phase2[f"{layer}.{branch}.sigma.weight"] == 0
    for grads in (phase1, phase2):  # neither correlation term touches the decoder
        assert grads["levels.0.head.weight"] == 0
        assert grads[f"{layer}.ffn.0.weight"] == 0
        assert all(v == 0 for k, v in grads.items() if k.startswith("levels.1."))


def _spec_target(sigma: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """FOD_METHOD.md's target, written out: for query cell i and key cell j,
    T_ij = 1/(2 pi sy sx) exp(-dy^2/(2 sy^2) - dx^2/(2 sx^2)), each row normalised."""
    height, width = grid
    cell_y = torch.arange(height, dtype=torch.float32).repeat_interleave(width)
    cell_x = torch.arange(width, dtype=torch.float32).repeat(height)
    dy2 = (cell_y[:, None] - cell_y[None, :]) ** 2
    dx2 = (cell_x[:, None] - cell_x[None, :]) ** 2
    sy, sx = sigma[..., 0, None], sigma[..., 1, None]  # (N, heads, L, 1)
    gauss = torch.exp(-dy2 / (2 * sy**2) - dx2 / (2 * sx**2)) / (2 * math.pi * sy * sx)
    return gauss / gauss.sum(-1, keepdim=True)


def _spec_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def _two_phase_reference_gradients(model, feats, lambda1: float, lambda2: float) -> dict:
    """The spec's two-phase objective from the model's raw outputs, two backward passes:
    backward(L1, retain_graph) then backward(L2), gradients summed in .grad."""
    eps = 1e-4
    model.zero_grad(set_to_none=True)
    phase1 = phase2 = 0.0
    for level, out in zip(model.levels, model(feats), strict=True):
        x, y = out.tokens, out.reconstruction
        cosine = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        rec = ((y - x) ** 2).mean() + (1 - cosine).mean()

        def branch(maps, grid=level.grid):
            """Div(T, sg S), Div(sg T, S) and Ent(S), each a mean over layers, batch,
            heads and tokens (all layers have the same shape)."""
            targets = torch.stack([_spec_target(m.sigma, grid) for m in maps])
            corr = torch.stack([m.correlation for m in maps])
            t_sg, s_sg = targets.detach(), corr.detach()
            div_t = (_spec_kl(targets, s_sg, eps) + _spec_kl(s_sg, targets, eps)).mean()
            div_s = (_spec_kl(t_sg, corr, eps) + _spec_kl(corr, t_sg, eps)).mean()
            ent = -(corr * torch.log(corr + eps)).sum(-1).mean()
            return div_t, div_s, ent

        intra_t, intra_s, intra_ent = branch(out.intra)
        inter_t, inter_s, inter_ent = branch(out.inter)
        phase1 = phase1 + rec + lambda1 * intra_t - lambda1 * inter_t
        phase2 = phase2 + (
            rec - lambda1 * intra_s - lambda2 * intra_ent + lambda1 * inter_s + lambda2 * inter_ent
        )
    phase1.backward(retain_graph=True)
    phase2.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_single_backward_equals_the_two_phase_reference():
    """The trainer's one backward pass gives the gradients of the method's two phases,
    each written here from FOD_METHOD.md and backpropagated on its own."""
    from dataclasses import replace

    from fod_core.config import TrainConfig
    from fod_core.trainer import FODTrainer

    lambda1, lambda2 = 0.3, 0.7  # unequal, so that swapped weights show
    model = make_model()
    model.config = replace(model.config, lambda1=lambda1, lambda2=lambda2)
    feats = features(2)
    reference = _two_phase_reference_gradients(model, feats, lambda1, lambda2)

    trainer = FODTrainer(model, config=TrainConfig(lr=1e-4, device="cpu", precision="fp32"))
    trainer.train_step(feats)  # zero_grad, one backward, a step; .grad keeps the gradients
    trained = dict(model.named_parameters())
    assert set(trained) == set(reference)
    # Absolute slack relative to the largest gradient: the key biases' true gradient is
    # 0 (softmax ignores a shift shared by all keys), so theirs is float noise.
    atol = 1e-6 * max(float(g.abs().max()) for g in reference.values())
    for name, expected in reference.items():
        got = trained[name].grad
        assert got is not None, name
        assert torch.allclose(got, expected, rtol=1e-4, atol=atol), name


def test_scores_do_not_depend_on_batch_size():
    model = make_model().eval()
    feats = features(5, seed=3)
    together = model.score_maps(feats)
    alone = [model.score_maps([f[i : i + 1] for f in feats]) for i in range(5)]
    for level, maps in enumerate(together):
        single = torch.cat([a[level] for a in alone])
        assert torch.allclose(maps, single, rtol=1e-5, atol=1e-7)


def test_token_scores_are_weighted_reconstruction_error():
    """score = rec * (max(softmax(-corr)) - softmax(-corr)) on hand-made tensors, with
    rec = mean_c (in - out)^2 + 1 - cos(in, out) and corr the inter branch's
    KL(S||T) + KL(T||S) averaged over heads and layers; softmax and max over the tokens."""
    from fod_core.model import AttentionMaps, LevelOutput

    eps = 1e-4
    # Two images of a 2x2 grid (L = 4 tokens), 2 channels.
    tokens = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]],
            [[2.0, 1.0], [-1.0, 1.0], [0.5, 0.5], [0.0, -3.0]],
        ]
    )
    reconstruction = torch.tensor(
        [
            [[0.0, 1.0], [0.0, 1.0], [3.0, 4.0], [2.0, 0.5]],
            [[1.0, 1.0], [1.0, -1.0], [0.5, 1.5], [0.5, -2.0]],
        ]
    )
    # Token (0, 0): in (1, 0), out (0, 1): mse 1, cosine 0 -> rec 2; token (0, 2) is exact.
    g = torch.Generator().manual_seed(0)

    def rows(*shape: int) -> torch.Tensor:  # probability rows (sum 1 over the last dim)
        raw = torch.rand(*shape, generator=g) + 0.05
        return raw / raw.sum(-1, keepdim=True)

    def maps(sharpness: float) -> AttentionMaps:  # N=2, heads=2, L=4, grid 2x2
        corr = torch.softmax(sharpness * torch.log(rows(2, 2, 4, 4)), -1)
        return AttentionMaps(corr, torch.zeros(2, 2, 4, 2), rows(2, 2, 4, 2), rows(2, 2, 4, 2))

    inter = [maps(3.0), maps(1.0)]  # two layers
    intra = [maps(2.0), maps(0.5)]  # must not enter the score
    output = LevelOutput(tokens, reconstruction, intra, inter)
    scores = FODLevel.token_scores(output, eps)

    x, y = tokens.double(), reconstruction.double()
    cosine = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    rec = ((x - y) ** 2).mean(-1) + 1 - cosine  # (N, L)
    assert rec[0, 0] == pytest.approx(2.0) and rec[0, 2] == pytest.approx(0.0, abs=1e-12)

    def kl(p, q):
        return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)

    per_layer = []
    for m in inter:
        s = m.correlation.double()
        ty, tx = m.target_rows.double(), m.target_cols.double()
        t = (ty[..., :, None] * tx[..., None, :]).reshape(2, 2, 4, 4)  # T[i, (r, c)]
        per_layer.append((kl(s, t) + kl(t, s)).mean(1))  # mean over heads -> (N, L)
    corr = torch.stack(per_layer).mean(0)
    weights = torch.softmax(-corr, dim=-1)
    expected = rec * (weights.max(-1, keepdim=True).values - weights)

    assert scores.shape == (2, 4)
    assert torch.allclose(scores.double(), expected, rtol=1e-5, atol=1e-7)
    # Each image's most-correlated token (least discrepancy) gets weight 0.
    least = corr.argmin(-1)
    assert torch.equal(scores[torch.arange(2), least], torch.zeros(2))
    assert expected.abs().max() > 1e-2  # the comparison is not between near-zero numbers


def test_scoring_path_skips_intra_maps_but_scores_the_same():
    model = make_model().eval()
    feats = features(2, seed=4)
    with torch.no_grad():
        for level, f in zip(model.levels, feats, strict=True):
            full, fast = level(f), level(f, scoring=True)
            assert len(full.intra) == len(level.layers) and fast.intra == []
            assert torch.allclose(fast.reconstruction, full.reconstruction, atol=1e-5)
            assert torch.allclose(
                FODLevel.token_scores(fast, 1e-4), FODLevel.token_scores(full, 1e-4), rtol=1e-4
            )


def test_validation_loss_without_maps_is_the_same_reconstruction():
    """The validation loss runs every attention fused (no maps held): the same
    reconstruction, so the same loss and the same best epoch, in a fraction of the memory."""
    model = make_model().eval()
    feats = features(3, seed=6)
    with torch.no_grad():
        full, lean = model(feats), model(feats, reconstruction_only=True)
    for with_maps, without in zip(full, lean, strict=True):
        assert without.intra == [] and without.inter == [] and with_maps.inter
        assert torch.allclose(without.reconstruction, with_maps.reconstruction, atol=1e-5)
    batch = [f[:2] for f in feats]
    with torch.no_grad():
        expected = sum(float(reconstruction_loss(o.tokens, o.reconstruction)) for o in model(batch))
    trainer = FODTrainer(model, config=TrainConfig(batch_size=2), progress=False)
    assert trainer.validation_loss(batch) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("lean", [False, True])
def test_micro_batches_give_the_whole_batch_gradient(lean):
    """A batch of 6 in passes of 6, 4 + 2 and 1: the same gradient (the loss is a mean over
    images), the same logged terms, so the same training in a micro-batch's memory."""
    feats = features(6, seed=7)
    runs = []
    for micro in (6, 4, 1):
        model = make_model(seed=1)
        config = TrainConfig(batch_size=6, micro_batch_size=micro, lean_attention=lean)
        trainer = FODTrainer(model, config=config, progress=False)
        stats = trainer.train_step(feats)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((stats, grads))
    (whole_stats, whole), others = runs[0], runs[1:]
    largest = max(g.abs().max() for g in whole.values())
    for stats, grads in others:
        assert grads.keys() == whole.keys()
        for name, grad in grads.items():
            assert (grad - whole[name]).abs().max() <= 1e-5 * largest, name
        assert stats == pytest.approx(whole_stats, rel=1e-5, abs=1e-7)


def test_score_maps_runs_only_the_levels_asked_for():
    model = make_model().eval()
    feats = features(1, seed=5)
    calls = []
    for i, level in enumerate(model.levels):
        level.register_forward_hook(lambda *_, i=i: calls.append(i))
    both = model.score_maps(feats)
    fine_only = model.score_maps(feats, levels=[True, False])
    assert calls == [0, 1, 0] and fine_only[1] is None
    assert torch.equal(fine_only[0], both[0])


def test_scoring_in_chunks_gives_the_same_maps(monkeypatch):
    """Large batches are scored a few images at a time to bound the attention maps."""
    import fod_core.model

    model = make_model().eval()
    feats = features(5, seed=6)
    whole = model.score_maps(feats)
    assert [level.scoring_chunk(torch.device("cpu")) for level in model.levels] == [
        fod_core.model.SCORING_MAP_BUDGET // (4 * 4 * 64 * 64),  # fp32, 4 heads, L=64
        fod_core.model.SCORING_MAP_BUDGET // (4 * 4 * 16 * 16),
    ]
    monkeypatch.setattr(fod_core.model, "SCORING_MAP_BUDGET", 1)  # one image per pass
    assert [level.scoring_chunk(torch.device("cpu")) for level in model.levels] == [1, 1]
    assert model.levels[0].scoring_chunk(torch.device("cuda")) > 1000  # not chunked on GPU
    for chunked, full in zip(model.score_maps(feats), whole, strict=True):
        assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-7)


def test_batch_larger_than_one_trains():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    feats = features(4)
    losses = []
    for _ in range(15):
        terms = [fod_objective(o, lambda1=0.5, lambda2=0.5, eps=1e-4) for o in model(feats)]
        optimizer.zero_grad()
        total_objective(terms).backward()
        optimizer.step()
        losses.append(sum(float(t.reconstruction.detach()) for t in terms))
    assert losses[-1] < losses[0]


def test_level_config_validation():
    with pytest.raises(ValueError, match="divisible by 4"):
        LevelConfig(d_model=30)
    with pytest.raises(ValueError, match="n_heads"):
        LevelConfig(d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="level configs"):
        ModelConfig(levels=(LevelConfig(d_model=32),))


def _loss_and_gradients(model, feats, *, lean: bool):
    model.zero_grad(set_to_none=True)
    config = model.config
    outputs = model(feats, lean=lean)
    terms = [fod_objective(o, lambda1=config.lambda1, lambda2=config.lambda2, eps=config.log_eps)
             for o in outputs]  # fmt: skip
    total_objective(terms).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.as_floats() for t in terms], grads, outputs


@pytest.mark.parametrize("rows", [1, 5, None])  # one row, blocks that do not divide L, default
def test_lean_attention_gives_the_same_losses_and_gradients(rows, monkeypatch):
    """Training keeps each attention map one block of query rows at a time and recomputes
    it in the backward pass: the losses and every gradient are those of the kept maps."""
    from fod_core import kernels

    torch.manual_seed(0)
    model = create_fod_model(small_config(), in_channels=CHANNELS, strides=STRIDES)
    feats = features(3)
    model.set_references([f.mean(0).flatten(1).T for f in feats])
    kept_terms, kept, _ = _loss_and_gradients(model, feats, lean=False)
    if rows is not None:
        monkeypatch.setattr(kernels, "rows_per_block", lambda *shape: rows)
    lean_terms, lean, outputs = _loss_and_gradients(model, feats, lean=True)
    assert all(m.correlation is None and m.terms is not None for m in outputs[0].inter)
    for kept_level, lean_level in zip(kept_terms, lean_terms, strict=True):
        assert lean_level == pytest.approx(kept_level, rel=1e-6)
    assert set(lean) == set(kept)
    scale = max(float(g.abs().max()) for g in kept.values())
    for name, gradient in kept.items():
        torch.testing.assert_close(lean[name], gradient, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_lean_attention_under_autocast_keeps_the_maps():
    """bf16 autocast (a GPU's training) keeps the maps: the blocked function is fp32."""
    model = create_fod_model(small_config(n_layers=1), in_channels=CHANNELS, strides=STRIDES)
    feats = features(2)
    model.set_references([f.mean(0).flatten(1).T for f in feats])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(feats, lean=True)
    assert all(m.correlation is not None and m.terms is None for m in outputs[0].inter)


def test_a_reference_per_image_is_the_class_reference_when_they_are_the_same():
    """One reference per image (the nearest-normals experiment) runs the same maths: given
    the class reference for every image, the outputs are the class reference's; given
    another, they differ for that image only."""
    model = make_model()
    batch = features(3)
    level = model.levels[0]
    expected = level(batch[0])
    same = level.reference[None].expand(3, -1, -1)
    got = level(batch[0], reference=same)
    torch.testing.assert_close(got.reconstruction, expected.reconstruction)
    torch.testing.assert_close(got.inter[0].correlation, expected.inter[0].correlation)
    other = same.clone()
    other[1] = torch.randn_like(other[1])
    changed = level(batch[0], reference=other)
    differs = (changed.reconstruction - expected.reconstruction).abs().amax(dim=(1, 2))
    assert differs[0] < 1e-5 and differs[2] < 1e-5 and differs[1] > 1e-3
