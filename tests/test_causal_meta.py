"""Causal meta-transfer (Bengio et al. 2019): the data, the two factorisations, the regret, and
the real `fwlab fit --model causal_meta --data causal_shift` run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from fwlab_plugins.data.causal_shift import CausalShiftConfig, CausalShiftDataModule
from fwlab_plugins.models import bivariate_categorical as bc

from .conftest import only_run_dir, read_results, run_fwlab


def datamodule(**values) -> CausalShiftDataModule:
    return CausalShiftDataModule(CausalShiftConfig(**values))


# -- the data -----------------------------------------------------------------------------------
def test_a_cause_intervention_keeps_p_b_given_a_and_changes_p_a():
    data = datamodule(transfer_samples=500, heldout_samples=1, test_episodes=200)
    transfer, _ = data.episodes("test", 200)
    a, b = transfer[..., 0].reshape(-1).numpy(), transfer[..., 1].reshape(-1).numpy()
    counts = np.zeros((10, 10))
    np.add.at(counts, (a, b), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    assert np.abs(empirical - data.pi_b_given_a).max() < 0.03  # 100k pairs
    # each episode has its own P'(A): the first two episodes' frequencies of A differ
    first, second = (np.bincount(transfer[e, :, 0], minlength=10) / 500 for e in (0, 1))
    assert np.abs(first - second).max() > 0.1


def test_an_effect_intervention_keeps_p_a_and_cuts_b_from_a():
    data = datamodule(intervention="effect", transfer_samples=2000, heldout_samples=1)
    transfer, _ = data.episodes("test", 50)
    a = transfer[..., 0].reshape(-1).numpy()
    assert np.abs(np.bincount(a, minlength=10) / len(a) - data.pi_a).max() < 0.01
    episode = transfer[0].numpy()  # within one episode B's frequencies do not depend on A
    for value in np.argsort(data.pi_a)[-2:]:  # the two commonest values of A
        given = np.bincount(episode[episode[:, 0] == value, 1], minlength=10)
        overall = np.bincount(episode[:, 1], minlength=10)
        assert np.abs(given / given.sum() - overall / overall.sum()).max() < 0.1


def test_episodes_are_fixed_by_the_seed_and_differ_between_splits():
    one, two = datamodule(), datamodule()
    torch.testing.assert_close(one.episodes("val", 5), two.episodes("val", 5))
    assert not torch.equal(one.episodes("val", 5)[0], one.episodes("test", 5)[0])
    assert not torch.equal(datamodule(seed=1).observational_joint(), one.observational_joint())
    assert one.observational_joint().sum().item() == pytest.approx(1.0)


def test_an_unknown_intervention_is_a_clear_error():
    from fwlab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.intervention='both'"):
        datamodule(intervention="both")


# -- the factorisations and the regret -----------------------------------------------------------
def test_bayes_reversal_of_the_ground_truth_gives_the_same_joint():
    joint = datamodule().observational_joint()
    tables = bc.from_joint(joint)
    a = torch.arange(10).repeat_interleave(10)[None]
    b = torch.arange(10).repeat(10)[None]
    pairs = torch.stack([a, b], -1)
    for direction in ("a_to_b", "b_to_a"):
        params = tuple(t[None] for t in tables[direction])
        likelihood = bc.log_likelihood(params, *bc.ordered(pairs, direction)).exp()
        torch.testing.assert_close(likelihood.view(10, 10), joint)


def test_the_regret_gradient_is_belief_minus_posterior_on_a_hand_checked_case():
    """γ = 0.3, log L_{A→B} = −10, log L_{B→A} = −12: σ(γ) = 0.574443, and
    P(A→B | D) = 0.574443 / (0.574443 + 0.425557 e^{−2}) = 0.908877, so ∂R/∂γ = −0.334435."""
    gamma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    value = bc.regret(gamma, torch.tensor(-10.0, dtype=torch.float64), torch.tensor(-12.0))
    (gradient,) = torch.autograd.grad(value, gamma)
    assert gradient.item() == pytest.approx(-0.334435, abs=1e-6)
    mixture = 0.574443 * math.exp(-10) + 0.425557 * math.exp(-12)
    assert value.item() == pytest.approx(-math.log(mixture), abs=1e-5)


def test_online_likelihood_matches_a_naive_per_episode_loop():
    """Batched over episodes against torch.optim.SGD on one episode's nn.Parameters at a time:
    each batch scored before the step that uses it."""
    generator = torch.Generator().manual_seed(0)
    marginal = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    conditional = torch.randn(3, 5, 5, generator=generator, dtype=torch.float64)
    pairs = torch.randint(0, 5, (3, 12, 2), generator=generator)
    batched = bc.online_log_likelihood((marginal, conditional), pairs, "b_to_a", 0.3, 3, 4)
    for e in range(3):
        m = torch.nn.Parameter(marginal[e].clone())
        c = torch.nn.Parameter(conditional[e].clone())
        optimiser = torch.optim.SGD([m, c], lr=0.3)
        total = 0.0
        for step in range(3):
            x = pairs[e, step * 4 : (step + 1) * 4, 1]  # b_to_a: x is B
            y = pairs[e, step * 4 : (step + 1) * 4, 0]
            log_p = m.log_softmax(0)[x] + c.log_softmax(1)[x, y]
            total += log_p.sum().item()
            optimiser.zero_grad()
            (-log_p.mean()).backward()
            optimiser.step()
        assert batched[e].item() == pytest.approx(total, abs=1e-9)


def test_both_models_start_equal_and_the_causal_one_adapts_faster_to_a_cause_shift():
    data = datamodule(heldout_samples=2000)
    transfer, held_out = data.episodes("test", 100)
    tables = bc.from_joint(data.observational_joint())
    curves = {
        d: bc.adaptation_curve(
            tuple(t.expand(100, *t.shape) for t in tables[d]), transfer, held_out, d, 0.1, 10
        ).mean(0)
        for d in ("a_to_b", "b_to_a")
    }
    assert curves["a_to_b"].shape == (11,)
    torch.testing.assert_close(curves["a_to_b"][0], curves["b_to_a"][0])
    assert (curves["a_to_b"][1:] > curves["b_to_a"][1:]).all()


# -- the real command ---------------------------------------------------------------------------
def test_fit_drives_the_belief_in_the_causal_direction_above_0_9(tmp_path):
    """The authors' protocol: N = 10, 1000 episodes, 2 SGD steps of 10 pairs at lr 0.1, γ by
    RMSProp at lr 1e-2. About 25 s on 2 CPU cores."""
    result = run_fwlab(
        "fit", "--model", "causal_meta", "--data", "causal_shift", "logger=csv", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    metrics = read_results(run_dir)["metrics"]
    assert metrics["test/belief"] > 0.9
    assert metrics["test/heldout_a_to_b_n100"] > metrics["test/heldout_b_to_a_n100"]
    with open(run_dir / "belief.csv") as file:
        belief = [float(row["belief_a_to_b"]) for row in csv.DictReader(file)]
    assert len(belief) == 1000 and belief[0] < 0.6 and belief[-1] > 0.9
    with open(run_dir / "adaptation.csv") as file:
        assert len(list(csv.DictReader(file))) == 11  # 0, 10, ..., 100 examples
    assert (run_dir / "causal_meta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "belief σ(γ) in A → B:" in result.stdout

    # the checkpoint alone rebuilds the run: `fwlab test` gives the same belief
    checkpoint = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    again = run_fwlab("test", "--ckpt", str(checkpoint), "logger=none", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    tested = [p for p in (tmp_path / "runs").iterdir() if p != run_dir][0]
    assert read_results(tested)["metrics"]["test/belief"] == pytest.approx(metrics["test/belief"])
    assert (tested / "causal_meta.png").is_file()


def test_a_model_and_data_of_other_kinds_are_refused_before_training(tmp_path):
    result = run_fwlab(
        "fit", "--model", "causal_meta", "--data", "retrieval", "logger=none", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "causal_meta adapts to episodes of category pairs" in result.stderr
    assert not (tmp_path / "runs").exists()
