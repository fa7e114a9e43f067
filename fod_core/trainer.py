"""The training loop, kept apart from the model: batches of cached features, both
phases of every level in one backward pass, a checkpoint every epoch, resume, and the
best epoch chosen on the held-out normal images."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fod_core.config import Device, TrainConfig
from fod_core.kernels import compile_enabled
from fod_core.losses import fod_objective, reconstruction_loss, total_objective
from fod_core.model import FODModel
from fod_core.runtime import autocast_for, configure_cpu_numerics

log = logging.getLogger(__name__)


# Images per forward/backward pass on a CPU (TrainConfig.micro_batch_size 0). Measured
# with the whole `fod train` at batch 8 (BENCHMARKS.md, training memory end to end).
AUTO_MICRO_BATCH = 4


def resolve_device(device: Device | str) -> torch.device:
    device = Device(device)
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device.value)


@dataclass
class EpochRecord:
    epoch: int
    train: dict[str, float]
    val_loss: float | None
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    best_val_loss: float | None
    history: list[EpochRecord] = field(default_factory=list)
    # torch.compile's warm-up (tracing and compiling the kernels), kept out of the epochs
    warmup_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "history": [asdict(r) for r in self.history],
            "warmup_seconds": self.warmup_seconds,
        }


class CheckpointMismatchError(RuntimeError):
    """A resume checkpoint that was written for another model or schedule."""


class FODTrainer:
    """Trains an FOD model on cached features; ``fit`` leaves the best epoch's weights in it."""

    def __init__(
        self,
        model: FODModel,
        *,
        config: TrainConfig,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        on_epoch_end: Callable[[int, FODModel], dict | None] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = resolve_device(config.device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0.0)
        self.extra_records: dict[int, dict] = {}

    # -- one step ---------------------------------------------------------------------
    def objective(
        self, batch: Sequence[torch.Tensor], neighbours: torch.Tensor | None = None
    ) -> tuple[list, torch.Tensor]:
        """The method's loss terms per level and their total, for one batch. ``neighbours``:
        the batch's nearest-normal bank rows (``ReferenceMode.NEAREST``)."""
        model_config = self.model.config
        with autocast_for(self.device, self.config.precision):
            terms = [
                fod_objective(
                    out,
                    lambda1=model_config.lambda1,
                    lambda2=model_config.lambda2,
                    eps=model_config.log_eps,
                )
                for out in self.model(batch, lean=self.config.lean_attention, neighbours=neighbours)
            ]
        return terms, total_objective(terms)

    def micro_batch_size(self, batch_size: int) -> int:
        """Images per forward/backward pass (``TrainConfig.micro_batch_size``)."""
        size = self.config.micro_batch_size
        if size <= 0:
            size = AUTO_MICRO_BATCH if self.device.type == "cpu" else batch_size
        return max(1, min(size, batch_size))

    def train_step(
        self, batch: Sequence[torch.Tensor], neighbours: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One Adam step on the batch, its gradient summed over micro-batches, each
        weighted by its share of the batch: the loss is a mean over images, so this is the
        whole batch's gradient while only a micro-batch's activations are held."""
        n = batch[0].shape[0]
        size = self.micro_batch_size(n)
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for start in range(0, n, size):
            part = [f[start : start + size] for f in batch]
            rows = None if neighbours is None else neighbours[start : start + size]
            terms, loss = self.objective(part, rows)
            share = part[0].shape[0] / n
            (loss * share if share < 1 else loss).backward()
            for level, t in enumerate(terms):
                for key, value in t.as_floats().items():
                    name = f"level{level}/{key}"
                    stats[name] = stats.get(name, 0.0) + value * share
        self.optimizer.step()
        return stats

    @torch.no_grad()
    def validation_loss(self, features: Sequence[torch.Tensor]) -> float | None:
        """Mean reconstruction loss of held-out normal images, summed over levels."""
        n = features[0].shape[0] if features else 0
        if n == 0:
            return None
        self.model.eval()
        total = 0.0
        size = self.micro_batch_size(self.config.batch_size)  # no more held than a step
        for start in range(0, n, size):
            batch = [f[start : start + size].to(self.device) for f in features]
            with autocast_for(self.device, self.config.precision):
                outputs = self.model(batch, reconstruction_only=True)
            rec = sum(
                float(reconstruction_loss(o.tokens.float(), o.reconstruction.float()))
                for o in outputs
            )
            total += rec * batch[0].shape[0]
        return total / n

    def warm_up(self, train_features: Sequence[torch.Tensor]) -> float:
        """Compile the kernels on one batch, forward and backward, without a weight update
        or a draw from the random generators: the first epoch's time is then the epoch's
        own. Returns the seconds it took."""
        started = time.perf_counter()
        size = self.micro_batch_size(self.config.batch_size)  # the shape the steps compile
        batch = [f[:size].to(self.device) for f in train_features]
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            self.objective(batch)[1].backward()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        log.info("torch.compile warm-up: %.1fs (not counted in the epochs)", seconds)
        return seconds

    @torch.no_grad()
    def training_neighbours(self, train_features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """For NEAREST: each training image's K nearest *other* training images (the bank
        holds the training set itself, so an image never serves as its own reference).
        Features are frozen, so this is found once, not per epoch."""
        if not self.model.nearest:
            return None
        n_train = train_features[0].shape[0]
        if self.model.levels[0].bank.shape[0] != n_train:
            raise ValueError(
                f"the reference bank holds {self.model.levels[0].bank.shape[0]} images, the "
                f"training set {n_train}: call model.fit_references(train_features) first"
            )
        found = []
        for start in range(0, n_train, 64):
            queries = [f[start : start + 64].to(self.device) for f in train_features[:1]]
            own = torch.arange(start, start + queries[0].shape[0], device=self.device)
            found.append(self.model.neighbours(queries, exclude=own))
        return torch.cat(found)

    # -- the loop ---------------------------------------------------------------------
    def fit(
        self,
        train_features: Sequence[torch.Tensor],
        val_features: Sequence[torch.Tensor] = (),
        *,
        resume: bool = False,
    ) -> TrainResult:
        cfg = self.config
        configure_cpu_numerics()
        torch.manual_seed(cfg.seed)
        n_train = train_features[0].shape[0]
        if n_train == 0:
            raise ValueError("no training images")
        self.model.to(self.device)
        result = TrainResult(best_epoch=0, best_val_loss=None)
        best_state = None
        start_epoch = 1
        if resume and self.checkpoint_dir and (self.checkpoint_dir / "last.pt").is_file():
            start_epoch, result, best_state = self._load_checkpoint()
            log.info("resuming at epoch %d of %d", start_epoch, cfg.epochs)
        result.warmup_seconds = self.warm_up(train_features) if compile_enabled() else 0.0
        neighbours = self.training_neighbours(train_features)
        for epoch in range(start_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            self.model.train()
            generator = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(n_train, generator=generator)
            sums: dict[str, float] = {}
            batches = range(0, n_train, cfg.batch_size)
            bar = tqdm(
                batches,
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=not self.progress,
                unit="batch",
                leave=False,
            )
            for start in bar:
                index = order[start : start + cfg.batch_size]
                batch = [f[index].to(self.device, non_blocking=True) for f in train_features]
                stats = self.train_step(
                    batch, None if neighbours is None else neighbours[index.to(self.device)]
                )
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value * len(index)
                bar.set_postfix(rec=f"{stats['level0/reconstruction']:.4f}")
            bar.close()
            train_means = {k: v / n_train for k, v in sums.items()}
            val_loss = self.validation_loss(val_features)
            record = EpochRecord(epoch, train_means, val_loss, time.perf_counter() - started)
            result.history.append(record)
            improved = (
                val_loss is None
                or result.best_val_loss is None
                or (val_loss < result.best_val_loss)
            )
            if improved:
                result.best_epoch, result.best_val_loss = epoch, val_loss
                best_state = copy.deepcopy(self.model.state_dict())
            if self.on_epoch_end is not None:
                extra = self.on_epoch_end(epoch, self.model)
                if extra:
                    self.extra_records[epoch] = extra
            self._save_checkpoint(epoch, result, best_state)
            vl = "n/a" if val_loss is None else f"{val_loss:.5f}"
            log.info(
                "epoch %d: train rec %.5f, val rec %s, %.1fs%s",
                epoch,
                train_means.get("level0/reconstruction", float("nan")),
                vl,
                record.seconds,
                " (best)" if improved else "",
            )
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return result

    # -- checkpoints ------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int, result: TrainResult, best_state) -> None:
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": best_state,
            "result": result.to_dict(),
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
        }
        tmp = self.checkpoint_dir / "last.pt.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.checkpoint_dir / "last.pt")

    def _load_checkpoint(self) -> tuple[int, TrainResult, dict | None]:
        try:
            payload = torch.load(
                self.checkpoint_dir / "last.pt", map_location=self.device, weights_only=False
            )
        except Exception as error:  # a truncated file raises many kinds of errors
            raise CheckpointMismatchError(
                f"{self.checkpoint_dir / 'last.pt'} is damaged ({type(error).__name__}); "
                "remove it or train without --resume"
            ) from error
        if payload["model_config"] != self.model.config.to_dict():
            raise CheckpointMismatchError(
                f"{self.checkpoint_dir / 'last.pt'} was written for another model config; "
                "remove it or train without --resume"
            )
        # Only --epochs may change; lean attention and micro-batches are the same training
        # in less memory.
        free = ("epochs", "lean_attention", "micro_batch_size")
        saved = {k: v for k, v in payload["train_config"].items() if k not in free}
        current = {k: v for k, v in self.config.to_dict().items() if k not in free}
        if saved != current:
            raise CheckpointMismatchError(
                f"{self.checkpoint_dir / 'last.pt'} was written with other training settings "
                f"({saved}); only --epochs may change on resume"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        raw = payload["result"]
        result = TrainResult(
            best_epoch=raw["best_epoch"],
            best_val_loss=raw["best_val_loss"],
            history=[EpochRecord(**r) for r in raw["history"]],
        )
        return payload["epoch"] + 1, result, payload["best_state"]
