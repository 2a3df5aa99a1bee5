"""Causal meta-transfer (Bengio et al. 2019): learn the causal direction from adaptation speed.

Two models of the pair (A, B) start from what observational pre-training teaches them, the
ground truth's joint (exactly: :func:`bivariate_categorical.from_joint`, the limit of training
on unlimited observational data). Per episode, a transfer distribution intervenes on one
variable; both models adapt by ``inner_steps`` SGD steps (lr ``inner_lr``) on batches of
``inner_batch_size`` transfer pairs, each batch scored before the step that uses it:

    log L_{A→B} = Σ_t log P_{A→B}(D_t; θ_t),   and likewise L_{B→A}.

The structural parameter γ (belief σ(γ) in A → B) then takes an optimiser step on the regret

    R = −log[σ(γ) L_{A→B} + (1 − σ(γ)) L_{B→A}],   ∂R/∂γ = σ(γ) − P(A→B | D).

The models are reset to their pre-trained tables at every episode, as in the authors' code.
After a cause intervention only P(A) of A → B is wrong (N numbers) while B → A must move P(B)
and all of P(A | B), so A → B predicts the transfer data better and σ(γ) rises.

Logged: ``train/belief`` (σ(γ)) and ``train/regret`` after every episode; at validation and test
``regret``, ``belief`` and the adaptation curves, the held-out log-likelihood per pair after
0, b, 2b, ... transfer examples for both directions. The test writes ``causal_meta.png``
(σ(γ) per episode; the adaptation curves) and the numbers behind it (``belief.csv``,
``adaptation.csv``) into the run directory.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from fwlab.bounds import bounded
from fwlab.config import dataclass_from
from fwlab.errors import IncompatibleError
from fwlab.metrics import MeanCurve
from fwlab.optim import OptimConfig, make_optimizer
from fwlab.spec import DataSpec
from fwlab_plugins.models import bivariate_categorical as bc

DIRECTIONS = ("a_to_b", "b_to_a")
LABELS = {"a_to_b": "A → B (causal)", "b_to_a": "B → A (anticausal)"}
BELIEF_KEY = "causal_meta_belief_history"


@dataclass
class CausalMetaConfig:
    # SGD learning rate of the adaptation (the authors': 0.1)
    inner_lr: float = bounded(0.1, at_least=0.0)
    # adaptation steps per episode in the regret (the authors': 2)
    inner_steps: int = bounded(2, at_least=1)
    # transfer pairs per adaptation step (the authors': 10)
    inner_batch_size: int = bounded(10, at_least=1)
    initial_structural_logit: float = 0.0  # γ before the first episode; σ(0) = 1/2


class RegretObjective:
    """Checkpoints keep the lowest validation regret; the summary reads the belief and the
    end points of the adaptation curves."""

    monitor = "regret"
    monitor_mode = "min"

    def summary(self, results: dict[str, float], split: str) -> list[str]:
        lines = []
        if f"{split}/belief" in results:
            lines.append(f"belief σ(γ) in A → B:  {results[f'{split}/belief']:.4f}")
        if f"{split}/regret" in results:
            lines.append(f"{split} regret:           {results[f'{split}/regret']:.3f} nats")
        ends = [k for k in results if k.startswith(f"{split}/heldout_a_to_b_")]
        for key in sorted(ends, key=lambda k: int(k.rsplit("_n", 1)[1])):
            n = key.rsplit("_n", 1)[1]
            other = results.get(key.replace("a_to_b", "b_to_a"), float("nan"))
            lines.append(
                f"held-out log-lik after {n:>4} examples: A→B {results[key]:.4f}, B→A {other:.4f}"
            )
        return lines


class CausalMetaTransfer(L.LightningModule):
    """Bengio et al.'s meta-transfer: the belief in A → B learnt from adaptation speed."""

    Config = CausalMetaConfig

    def __init__(self, spec: DataSpec, config: CausalMetaConfig, optim: OptimConfig) -> None:
        super().__init__()
        self.config = config
        self.optim_config = optim
        self.objective = RegretObjective()
        self.structural_logit = nn.Parameter(torch.tensor(config.initial_structural_logit))
        n = spec.input_size
        # the pre-trained tables (log-probabilities), filled from the datamodule in setup()
        for direction in DIRECTIONS:
            self.register_buffer(f"{direction}_marginal", torch.zeros(n))
            self.register_buffer(f"{direction}_conditional", torch.zeros(n, n))
        points = 1 + spec.seq_len // config.inner_batch_size
        self.curve_points = [i * config.inner_batch_size for i in range(points)]
        self.regret_metric = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self.curves = nn.ModuleDict(
            {f"{s}_{d}": MeanCurve(points) for s in ("val", "test") for d in DIRECTIONS}
        )
        self.belief_history: list[float] = []

    @classmethod
    def build(cls, config: DictConfig, spec: DataSpec, registry: Any) -> CausalMetaTransfer:
        if spec.input_kind != "category_pairs":
            raise IncompatibleError(
                "causal_meta adapts to episodes of category pairs (input kind 'category_pairs', "
                f"e.g. --data causal_shift); this datamodule gives '{spec.input_kind}'"
            )
        model_config = dataclass_from(cls.Config, config.model)
        needed = model_config.inner_steps * model_config.inner_batch_size
        if spec.seq_len is None or spec.seq_len < needed:
            raise IncompatibleError(
                f"model.inner_steps × model.inner_batch_size = {needed} transfer pairs per "
                f"episode, but the datamodule gives {spec.seq_len} (data.transfer_samples)"
            )
        return cls(spec, model_config, dataclass_from(OptimConfig, config.optim))

    def setup(self, stage: str) -> None:
        """Pre-train: both factorisations of the datamodule's observational joint."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "observational_joint"):
            raise IncompatibleError(
                f"causal_meta pre-trains on the ground truth's observational joint, which "
                f"{type(datamodule).__name__} does not provide (observational_joint())"
            )
        tables = bc.from_joint(datamodule.observational_joint())
        for direction, (marginal, conditional) in tables.items():
            getattr(self, f"{direction}_marginal").copy_(marginal)
            getattr(self, f"{direction}_conditional").copy_(conditional)

    def pretrained(self, direction: str, episodes: int) -> bc.Factorisation:
        marginal = getattr(self, f"{direction}_marginal")
        conditional = getattr(self, f"{direction}_conditional")
        return (
            marginal.expand(episodes, *marginal.shape),
            conditional.expand(episodes, *conditional.shape),
        )

    @property
    def belief(self) -> torch.Tensor:
        """σ(γ), the belief that A causes B."""
        return torch.sigmoid(self.structural_logit)

    # -- the meta-objective ---------------------------------------------------------------------
    def episode_regret(self, transfer: torch.Tensor) -> torch.Tensor:
        """R per episode of ``transfer`` ``(E, M, 2)``, differentiable in γ only."""
        c = self.config
        log_l = {
            d: bc.online_log_likelihood(
                self.pretrained(d, len(transfer)),
                transfer,
                d,
                c.inner_lr,
                c.inner_steps,
                c.inner_batch_size,
            )
            for d in DIRECTIONS
        }
        return bc.regret(self.structural_logit, log_l["a_to_b"], log_l["b_to_a"])

    def training_step(self, batch: Sequence[torch.Tensor], _: int) -> torch.Tensor:
        transfer = batch[0]
        loss = self.episode_regret(transfer).mean()
        self.log("train/regret", loss, on_step=True, on_epoch=True, batch_size=len(transfer))
        self.log("train/belief", self.belief.detach(), on_step=True, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:  # after the optimiser step
        self.belief_history.append(self.belief.item())

    def _evaluate(self, batch: Sequence[torch.Tensor], split: str) -> None:
        transfer, held_out = batch
        regret = self.regret_metric[split]
        regret.update(self.episode_regret(transfer))
        self.log(f"{split}/regret", regret, on_epoch=True, prog_bar=True)
        self.log(f"{split}/belief", self.belief.detach(), on_epoch=True, batch_size=1)
        for d in DIRECTIONS:
            curve = bc.adaptation_curve(
                self.pretrained(d, len(transfer)),
                transfer,
                held_out,
                d,
                self.config.inner_lr,
                self.config.inner_batch_size,
            )
            self.curves[f"{split}_{d}"].update(curve)

    def _log_curves(self, split: str) -> dict[str, dict[str, torch.Tensor]]:
        """Log the curves at 0 examples, at the regret's horizon and at the end; reset them."""
        horizon = self.config.inner_steps
        curves = {d: self.curves[f"{split}_{d}"].compute() for d in DIRECTIONS}
        for d, curve in curves.items():
            for index in sorted({0, horizon, len(self.curve_points) - 1}):
                n = self.curve_points[index]
                self.log(f"{split}/heldout_{d}_n{n}", curve["mean"][index].float())
            self.curves[f"{split}_{d}"].reset()
        return curves

    def validation_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_curves("val")

    def on_test_epoch_end(self) -> None:
        curves = self._log_curves("test")
        if self.trainer.is_global_zero:
            write_figure(
                Path(self.trainer.default_root_dir), self.belief_history, self.curve_points, curves
            )

    # -- keeping the belief's history with the checkpoint --------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BELIEF_KEY] = list(self.belief_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.belief_history = list(checkpoint.get(BELIEF_KEY, []))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer([self.structural_logit], self.optim_config)


def write_figure(
    directory: Path,
    belief: list[float],
    points: list[int],
    curves: dict[str, dict[str, torch.Tensor]],
) -> None:
    """``belief.csv``, ``adaptation.csv`` and ``causal_meta.png`` (both, side by side)."""
    from matplotlib.figure import Figure  # here: only this model needs matplotlib

    with open(directory / "belief.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["episode", "belief_a_to_b"])
        writer.writerows((i + 1, f"{b:.6f}") for i, b in enumerate(belief))
    with open(directory / "adaptation.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["examples", *(f"{d}_{s}" for d in DIRECTIONS for s in ("mean", "stderr"))])
        for i, n in enumerate(points):
            row = [f"{curves[d][s][i].item():.6f}" for d in DIRECTIONS for s in ("mean", "stderr")]
            writer.writerow([n, *row])

    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(range(1, len(belief) + 1), belief)
    left.set(xlabel="episode", ylabel="σ(γ) = belief in A → B", ylim=(0, 1))
    left.axhline(0.5, color="grey", linewidth=0.5)
    for d in DIRECTIONS:
        mean, stderr = curves[d]["mean"].cpu().numpy(), curves[d]["stderr"].cpu().numpy()
        right.plot(points, mean, label=LABELS[d])
        right.fill_between(points, mean - stderr, mean + stderr, alpha=0.3)
    right.set(xlabel="transfer examples", ylabel="held-out log-likelihood per pair")
    right.legend()
    figure.savefig(directory / "causal_meta.png", dpi=100)
