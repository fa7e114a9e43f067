"""Recipe settings chosen at training time by a stated, label-free rule, never fixed after
looking at test labels.

The nearest-normal reference's K (``--reference-k 0``, ``--preset hard``): before training,
each candidate K scores the validation's *choice* images and copies of them with planted
anomalies by the training-free retrieval distance (the largest per-position squared
distance of the finer level's features to the mean of the K nearest training normals,
found as ``FODModel.neighbours`` finds them). The K with the best image AUROC of planted
against clean wins; ties go to the smaller K (cheaper, closer to the image itself).

The whole recipe (``--preset auto``, ``choose_recipe``): planting by the part's size, then
every alignment x reference (class, or nearest K) x retrieval window x score region (the
whole picture, or the part alone: ``ScoreRegion``), each judged the same way by its
retrieval distance (``fod_core.retrieval``) through the model's own post-processing. The
model then gets two retrieval branches (``RetrievalFeatures.BOTH``), judged here by the
finer level's, where the neighbours are found; the local features' branch enters by the
weights chosen after training on planted anomalies, like FOD's levels. A flag may ask for
one kind alone (``--retrieval-features finer|local``), then judged by its own distance.
The calibration images take no part in either, so the threshold's promise holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fod_core.metrics import image_auroc
from fod_core.processing import Alignment, ScoreRegion, read_image
from fod_core.retrieval import (
    ANY_POSITION,
    RetrievalFeatures,
    describe_window,
    retrieval_features,
    window_reach,
)
from fod_core.synthetic import PLANTED_SEED, Planting, planted_copies

log = logging.getLogger(__name__)

K_CANDIDATES = (1, 3, 5, 10)
AUTO = 0  # ``ModelConfig.reference_k`` 0: choose K by this rule at training time


@dataclass(frozen=True)
class ReferenceKChoice:
    k: int
    rule: str
    n_choice_images: int
    n_planted: int
    candidates: list[dict] = field(default_factory=list)  # per K: its planted image AUROC

    def to_dict(self) -> dict:
        return asdict(self)


def require_choice_images(n_choice: int) -> None:
    """Fail before any work when K cannot be chosen."""
    from fod_core.data import DatasetError

    if n_choice == 0:
        raise DatasetError(
            "choosing the reference K needs validation images to choose on (the choice part "
            "is empty): add normal images, raise the validation or choice fraction, or give "
            "--reference-k"
        )


@torch.no_grad()
def _finer_level(extractor, pre, images: Sequence, batch_size: int = 8) -> torch.Tensor:
    return _levels_and_regions(extractor, pre, images, batch_size, regions=False)[0][0]


@torch.no_grad()
def _levels_and_regions(
    extractor, pre, images: Sequence, batch_size: int = 8, *, regions: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The images' features per level (finer first) and, with ``regions``, their part
    regions (``PreProcessing.part_regions``, what ``ScoreRegion.PART`` scores)."""
    levels, masks = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.stack([pre(read_image(i) if isinstance(i, str | Path) else i) for i in chunk])
        device = next(extractor.parameters()).device  # the cache may have moved it
        levels.append([f.float().cpu() for f in extractor(batch.to(device))])
        if regions:
            masks.append(pre.part_regions(batch))
    return [torch.cat(level) for level in zip(*levels, strict=True)], (
        torch.cat(masks) if regions else None
    )


def retrieval_scores(bank: torch.Tensor, queries: torch.Tensor, ks: Sequence[int]) -> dict:
    """Per K: each query's largest per-position squared distance to the mean of its K
    nearest bank maps (whole-map squared distance, as the model retrieves)."""
    flat_bank = bank.flatten(2)  # (M, C, L)
    flat = flat_bank.flatten(1)
    scores: dict[int, list[float]] = {k: [] for k in ks}
    for image in queries.flatten(2):
        order = ((flat - image.flatten()[None]) ** 2).sum(1).argsort()
        for k in ks:
            reference = flat_bank[order[:k]].mean(0)
            scores[k].append(float(((image - reference) ** 2).sum(0).max()))
    return {k: np.asarray(v) for k, v in scores.items()}


def choose_reference_k(
    extractor,
    pre,
    train_level0: torch.Tensor,
    choice_images: Sequence[str | Path],
    *,
    planting: Planting | str = Planting.ANYWHERE,
    per_image: int = 3,
    candidates: Sequence[int] = K_CANDIDATES,
) -> ReferenceKChoice:
    """K for the nearest-normal reference, by the module's rule, on the choice images."""
    require_choice_images(len(choice_images))
    ks = [k for k in candidates if k <= train_level0.shape[0]] or [1]
    normals, draws = planted_copies(
        list(choice_images), per_image=per_image, seed=PLANTED_SEED, planting=Planting(planting)
    )
    planted = [image for image, _ in draws]
    queries = _finer_level(extractor, pre, list(normals) + planted)
    scores = retrieval_scores(train_level0.float(), queries, ks)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(planted))]
    rows = [{"k": k, "planted_image_auroc": round(image_auroc(labels, scores[k]), 4)} for k in ks]
    best = max(rows, key=lambda r: (r["planted_image_auroc"], -r["k"]))
    choice = ReferenceKChoice(
        best["k"],
        "best planted image AUROC of the training-free retrieval distance on the choice "
        "images, ties to the smaller K",
        len(normals),
        len(planted),
        rows,
    )
    log.info("reference K %d chosen on %d choice images: %s", choice.k, len(normals), rows)
    return choice


# --- the whole recipe (``--preset auto``) -------------------------------------------------

# retrieval windows tried: position to position, one and two positions away, and any
# position of the K nearest normals (location-free, ``fod_core.retrieval.ANY_POSITION``)
WINDOWS = (1, 3, 5, ANY_POSITION)
# The recipe's K candidates: the reference-K rule's and 20, the flattest reference (ELPV
# mono's choice images preferred it, and screw's and bottle's choices did not move).
RECIPE_KS = (*K_CANDIDATES, 20)
CLASS_REFERENCE = 0  # a candidate's K 0: the class reference (the mean of every normal)
# Planted small and on the part where a part stands out from a plain background and fills
# under a quarter of the photo (a screw: 12-15 % by ``part_pixels``); a product that fills
# the photo (a bottle, a solar cell) has no such part and is planted anywhere.
SMALL_PART = 0.25


@dataclass(frozen=True)
class RecipeSpace:
    """The candidates ``choose_recipe`` tries. A part a user fixes with its own flag
    (``fod train --alignment``, ``--reference``, ``--reference-k``, ``--retrieval-window``,
    ``--retrieval-features``, ``--planting``, ``--score-region``) is tried alone; the rest
    is still chosen."""

    alignments: tuple[Alignment, ...] = tuple(Alignment)
    ks: tuple[int, ...] = (CLASS_REFERENCE, *RECIPE_KS)
    windows: tuple[int, ...] = WINDOWS
    # both branches, judged by the finer level's: local features alone won the retrieval
    # evidence on bottle and ELPV mono, but localised planted anomalies worse, and mono's
    # test AUROC fell from 0.956 to 0.891 (BENCHMARKS.md, "Every level's local features");
    # beside the finer branch, the weights give it what it adds ("Both retrieval branches")
    features: tuple[RetrievalFeatures, ...] = (RetrievalFeatures.BOTH,)
    planting: Planting | None = None  # None: chosen by the part's size
    regions: tuple[ScoreRegion, ...] = tuple(ScoreRegion)

    @classmethod
    def from_flags(
        cls,
        *,
        alignment: str | None = None,
        reference: str | None = None,
        reference_k: int | None = None,
        retrieval_window: int | None = None,
        retrieval_features: str | None = None,
        planting: str | None = None,
        score_region: str | None = None,
    ) -> RecipeSpace:
        if retrieval_window == 0:
            from fod_core.config import SettingsError

            raise SettingsError(
                "--preset auto always scores the retrieval branch beside FOD's levels (its "
                "window is chosen: 1, 3, 5 or -1, any position): for none, train with "
                "--preset method or hard"
            )
        ks = cls.ks
        if reference == "class":
            ks = (CLASS_REFERENCE,)
        elif reference == "nearest" or (reference_k not in (None, AUTO)):
            ks = RECIPE_KS
        if reference != "class" and reference_k not in (None, AUTO):
            ks = (int(reference_k),)
        return cls(
            alignments=(Alignment(alignment),) if alignment else cls.alignments,
            ks=ks,
            windows=(int(retrieval_window),) if retrieval_window else cls.windows,
            features=(
                (RetrievalFeatures(retrieval_features),) if retrieval_features else cls.features
            ),
            planting=Planting(planting) if planting else None,
            regions=(ScoreRegion(score_region),) if score_region else cls.regions,
        )

    def fixed(self) -> dict:
        """The parts fixed by flags, as recorded beside the choice."""
        whole = RecipeSpace()
        return {
            name: [getattr(v, "value", v) for v in value]
            if isinstance(value, tuple)
            else getattr(value, "value", value)
            for name, value in asdict(self).items()
            if value != asdict(whole)[name]
        }


@dataclass(frozen=True)
class RecipeChoice:
    """What ``--preset auto`` chose before training, and on what evidence (no labels)."""

    alignment: str
    reference: str  # "class" (the method's) or "nearest"
    reference_k: int  # 0 with the class reference
    retrieval_window: int
    planting: str
    rule: str
    n_choice_images: int
    n_planted: int
    n_tail_normals: int = 0  # training normals scored leave-one-out beside the choice images
    planting_evidence: dict = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)
    fixed_by_flags: dict = field(default_factory=dict)  # RecipeSpace.fixed(): not chosen
    score_region: str = ScoreRegion.WHOLE.value  # where the image score looks
    retrieval_features: str = RetrievalFeatures.FINER.value  # what the distance compares

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        reference = "class" if self.reference == "class" else f"nearest {self.reference_k}"
        return (
            f"alignment {self.alignment}, reference {reference}, retrieval window "
            f"{describe_window(self.retrieval_window)} on {self.retrieval_features} features, "
            f"planting {self.planting}, score over the "
            f"{'part' if self.score_region == ScoreRegion.PART.value else 'whole picture'}"
        )


def choose_planting(choice_images: Sequence[str | Path]) -> tuple[Planting, dict]:
    """PART (small, on the part) when in most choice images a part stands out from a plain
    background and fills under ``SMALL_PART`` of the photo (a screw on a table); else
    ANYWHERE (a bottle, a solar cell: the product fills the photo)."""
    from fod_core.synthetic import part_mask

    fractions = []
    for path in choice_images:
        part = part_mask(np.asarray(read_image(path), dtype=np.float32) / 255.0)
        fractions.append(None if part is None else float(part.mean()))
    small = sum(f is not None and f < SMALL_PART for f in fractions)
    planting = Planting.PART if small > len(fractions) / 2 else Planting.ANYWHERE
    evidence = {
        "images": len(fractions),
        "small_part_images": small,
        "median_part_fraction": (
            float(np.median([f for f in fractions if f is not None]))
            if any(f is not None for f in fractions)
            else None
        ),
    }
    return planting, evidence


def candidate_scores(
    bank: torch.Tensor,
    queries: torch.Tensor,
    ks: Sequence[int],
    windows: Sequence[int],
    post,
    regions: torch.Tensor | None = None,
    *,
    finer: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[tuple, np.ndarray]:
    """Per (K, window, score region), each query's image score of the retrieval distance
    alone (its map through ``post``, the model's own upsampling, smoothing and max, over
    the whole map and, given the queries' ``regions`` (Q, S, S), over the part). K 0: the
    class reference. bank (M, C, H, W), queries (Q, C, H, W): the retrieval features
    compared; ``finer`` (bank, queries): the finer level the neighbours are found on, as
    the model finds them (default: bank and queries themselves)."""
    from fod_core.retrieval import window_min_distance

    order_bank, order_queries = finer if finer is not None else (bank, queries)
    flat = order_bank.flatten(1)
    class_rows = bank.mean(0)[None, None]
    kinds = [ScoreRegion.WHOLE] + ([ScoreRegion.PART] if regions is not None else [])
    scores: dict[tuple, list[float]] = {(k, w, r): [] for k in ks for w in windows for r in kinds}
    for index, query in enumerate(queries):
        order = ((flat - order_queries[index].flatten()[None]) ** 2).sum(1).argsort()
        for k in ks:
            rows = class_rows if k == CLASS_REFERENCE else bank[order[:k]][None]
            for window in windows:
                anomaly_map = post.anomaly_map([window_min_distance(query[None], rows, window)])
                scores[(k, window, ScoreRegion.WHOLE)].append(float(post.image_score(anomaly_map)))
                if regions is not None:
                    part = post.image_score(anomaly_map, regions[index : index + 1])
                    scores[(k, window, ScoreRegion.PART)].append(float(part))
    return {key: np.asarray(v) for key, v in scores.items()}


def score_region_for(planting: Planting, space: RecipeSpace) -> ScoreRegion:
    """The part alone where anomalies are planted on the part (``choose_planting`` found a
    small part on a plain background in most choice images): the same assumption, that
    defects lie on the part, scores and plants. The choice images alone could not choose
    it (on screw, 98.7% of planted copies stood above their maximum whole or part), while
    the normals' tail that sets the threshold lies off the part, on background specks and
    filled corners (BENCHMARKS.md, bench_part_region.py). Both regions' evidence is kept."""
    if len(space.regions) == 1:
        return space.regions[0]
    return ScoreRegion.PART if planting is Planting.PART else ScoreRegion.WHOLE


# Normals whose tail a threshold at their maximum meets: beside the clean choice images, up
# to this many training normals (evenly spaced in the bank), each scored against the bank
# without itself. The choice images alone are too few to hold the tail: on screw, the
# normals that set the threshold peak on background specks one image in twenty.
TAIL_NORMALS = 50


def _tail_index(n_bank: int, training_images: Sequence) -> np.ndarray:
    if len(training_images) != n_bank or n_bank < 2:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, n_bank - 1, min(TAIL_NORMALS, n_bank)).round().astype(int))


def _part_regions(pre, images: Sequence, batch_size: int = 8) -> torch.Tensor:
    return torch.cat(
        [
            pre.part_regions(torch.stack([pre(read_image(i)) for i in images[s : s + batch_size]]))
            for s in range(0, len(images), batch_size)
        ]
    )


def leave_one_out_scores(
    bank: torch.Tensor,
    index: Sequence[int],
    ks: Sequence[int],
    windows: Sequence[int],
    post,
    regions: torch.Tensor | None = None,
    *,
    finer: torch.Tensor | None = None,
) -> dict[tuple, np.ndarray]:
    """``candidate_scores`` of the bank's own rows ``index``, each against the bank without
    itself: training normals scored as a new normal would be. ``finer``: the bank's finer
    level, where neighbours are found (default: the bank)."""
    finer = bank if finer is None else finer
    scores: dict[tuple, list[float]] = {}
    for j, i in enumerate(index):
        keep = torch.ones(len(bank), dtype=torch.bool)
        keep[int(i)] = False
        one = None if regions is None else regions[j : j + 1]
        row = slice(int(i), int(i) + 1)
        found = candidate_scores(
            bank[keep], bank[row], ks, windows, post, one, finer=(finer[keep], finer[row])
        )
        for key, value in found.items():
            scores.setdefault(key, []).append(float(value[0]))
    return {key: np.asarray(v) for key, v in scores.items()}


def caught_above_normals(labels: np.ndarray, scores: np.ndarray) -> float:
    """The share of planted copies scored above every normal: what a threshold
    at the normals' maximum (calibration's, with few normals) would catch."""
    return float((scores[labels == 1] > scores[labels == 0].max()).mean())


def choose_recipe(
    features_for,
    choice_images: Sequence[str | Path],
    *,
    image_size: int,
    score_sigma: float,
    space: RecipeSpace | None = None,
    per_image: int = 3,
    training_images: Sequence[str | Path] = (),
) -> RecipeChoice:
    """The recipe whose training-free score puts the most planted copies of the choice
    images above every normal (the clean choice images, and ``training_images``, the bank's
    images in its order, ``TAIL_NORMALS`` of them scored leave-one-out), then the best
    planted image AUROC against them, among ``space``'s candidates (all by default).
    ``features_for(alignment)`` -> (extractor, pre, training images' features per level
    [(M, C_l, H_l, W_l)], finer first), from the feature cache (the chosen one is reused by
    training). ``RetrievalFeatures.BOTH`` is judged by the finer level's distance. Ties go
    to the simpler: no alignment, the finer level's features (then local, then both), the
    smaller window (any position the largest), then the smaller K (the class reference
    first).
    The score region is ``score_region_for`` the planting."""
    from fod_core.processing import PostProcessing

    space = space or RecipeSpace()
    require_choice_images(len(choice_images))
    planting, evidence = choose_planting(choice_images)
    if space.planting is not None:
        planting, evidence = space.planting, evidence | {"fixed_by_flag": True}
    normals, draws = planted_copies(
        list(choice_images), per_image=per_image, seed=PLANTED_SEED, planting=planting
    )
    planted = [image for image, _ in draws]
    post = PostProcessing(image_size, score_sigma)
    with_regions = ScoreRegion.PART in space.regions
    rows, n_tail = [], 0
    for alignment in space.alignments:
        extractor, pre, levels = features_for(alignment)
        levels = [level.float() for level in levels]
        finer = levels[0]
        tail_index = _tail_index(len(finer), training_images)
        rows_left = finer.shape[0] - (1 if len(tail_index) else 0)  # a leave-one-out bank
        usable = [k for k in space.ks if k <= rows_left] or [min(space.ks)]
        query_levels, regions = _levels_and_regions(
            extractor, pre, list(normals) + planted, regions=with_regions
        )
        tail_images = [training_images[i] for i in tail_index]
        tail_regions = _part_regions(pre, tail_images) if with_regions and len(tail_index) else None
        n_tail = max(n_tail, len(tail_index))
        for kind in space.features:
            judged = RetrievalFeatures.FINER if kind is RetrievalFeatures.BOTH else kind
            bank = retrieval_features(levels, judged)
            queries = retrieval_features(query_levels, judged)
            scores = candidate_scores(
                bank, queries, usable, space.windows, post, regions, finer=(finer, query_levels[0])
            )
            tail = {}
            if len(tail_index):
                tail = leave_one_out_scores(
                    bank, tail_index, usable, space.windows, post, tail_regions, finer=finer
                )
            for (k, window, region), values in scores.items():
                if region not in space.regions:
                    continue
                clean = np.r_[values[: len(normals)], tail.get((k, window, region), [])]
                labels = np.r_[np.zeros(len(clean)), np.ones(len(planted))]
                ranked = np.r_[clean, values[len(normals) :]]
                caught = caught_above_normals(labels, ranked)
                rows.append(
                    {
                        "alignment": alignment.value,
                        "features": kind.value,
                        "reference": "class" if k == CLASS_REFERENCE else "nearest",
                        "k": k,
                        "window": window,
                        "score_region": region.value,
                        "planted_caught_above_normals": round(caught, 4),
                        "planted_image_auroc": round(image_auroc(labels, ranked), 4),
                    }
                )
            del bank, queries
    region = score_region_for(planting, space)
    order = {a.value: i for i, a in enumerate(Alignment)}
    simpler = {f.value: i for i, f in enumerate(RetrievalFeatures)}
    best = max(
        (r for r in rows if r["score_region"] == region.value),
        key=lambda r: (
            r["planted_caught_above_normals"],
            r["planted_image_auroc"],
            -order[r["alignment"]],
            -simpler[r["features"]],
            -window_reach(r["window"]),
            -r["k"],
        ),
    )
    choice = RecipeChoice(
        alignment=best["alignment"],
        reference=best["reference"],
        reference_k=best["k"],
        retrieval_window=best["window"],
        retrieval_features=best["features"],
        planting=planting.value,
        score_region=best["score_region"],
        rule="score over the part where planting is on the part, else the whole picture; "
        "then, by the training-free retrieval distance, the most planted copies of the "
        "choice images above every normal (the clean choice images and training normals "
        "left out of the bank in turn), then the best planted image AUROC against them "
        "(both retrieval branches judged by the finer level's); "
        "ties to no alignment, the finer level's features (then local, then both), the "
        "smaller window (any "
        "position the largest), then the smaller K (the class reference first)",
        n_choice_images=len(normals),
        n_tail_normals=n_tail,
        n_planted=len(planted),
        planting_evidence=evidence,
        candidates=rows,
        fixed_by_flags=space.fixed(),
    )
    log.info("recipe chosen on %d choice images: %s", len(normals), choice.describe())
    return choice
