"""Objectives: targets, corruption rates, determinism and loss normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stackwise.training.objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedDiffusion,
    MaskedLM,
    build_objective,
)

MASK = 257
VOCAB = 260


def _ids(shape: tuple[int, int] = (64, 512), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_clm_targets_are_next_tokens_and_last_is_ignored() -> None:
    ids = _ids((2, 8))
    batch = CausalLM().corrupt(ids)
    assert torch.equal(batch.inputs, ids)
    assert torch.equal(batch.targets[:, :-1], ids[:, 1:])
    assert (batch.targets[:, -1] == IGNORE_INDEX).all()


def test_clm_ignores_padding_targets() -> None:
    ids = _ids((1, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    batch = CausalLM().corrupt(ids, None, mask)
    assert batch.targets[0, :3].tolist() == ids[0, 1:4].tolist()
    assert (batch.targets[0, 3:] == IGNORE_INDEX).all()


def test_mlm_rates_80_10_10() -> None:
    ids = _ids()
    batch = MaskedLM(MASK, VOCAB, 0.15).corrupt(ids, torch.Generator().manual_seed(1))
    selected = batch.targets != IGNORE_INDEX
    rate = selected.float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(batch.targets[selected], ids[selected])
    masked = (batch.inputs == MASK) & selected
    unchanged = (batch.inputs == ids) & selected
    changed_random = selected & ~masked & ~unchanged
    n = selected.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    # A random replacement can hit the original token (1/260), so "unchanged" is slightly > 10%.
    assert abs(unchanged.sum().item() / n - 0.1) < 0.02
    assert abs(changed_random.sum().item() / n - 0.1) < 0.02
    # Unselected positions are never touched.
    assert torch.equal(batch.inputs[~selected], ids[~selected])


def test_mlm_is_deterministic_given_the_generator() -> None:
    ids = _ids((4, 64))
    objective = MaskedLM(MASK, VOCAB)
    a = objective.corrupt(ids, torch.Generator().manual_seed(5))
    b = objective.corrupt(ids, torch.Generator().manual_seed(5))
    c = objective.corrupt(ids, torch.Generator().manual_seed(6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)


def test_diffusion_mask_ratio_follows_t_per_sequence() -> None:
    ids = _ids((32, 2048))
    objective = MaskedDiffusion(MASK, 0.15, 0.9)
    generator = torch.Generator().manual_seed(3)
    batch = objective.corrupt(ids, generator)
    masked = batch.targets != IGNORE_INDEX
    assert torch.equal(masked, batch.inputs == MASK)
    assert batch.weights is not None
    ratios = masked.float().mean(dim=1)
    # The weight of a masked position is 1/t of its sequence: recover t and compare.
    t = 1.0 / batch.weights.max(dim=1).values
    assert ((t >= 0.15) & (t <= 0.9)).all()
    assert (ratios - t).abs().max().item() < 0.05
    assert (batch.weights[~masked] == 0).all()
    assert t.std().item() > 0.1  # t varies across sequences


def test_diffusion_eval_uses_the_fixed_grid() -> None:
    ids = _ids((16, 1024))
    objective = MaskedDiffusion(MASK, t_grid=[0.2, 0.8])
    entries = objective.eval_corruptions(ids, torch.Generator().manual_seed(0))
    assert len(entries) == 2
    rates = [(e.targets != IGNORE_INDEX).float().mean().item() for e in entries]
    assert abs(rates[0] - 0.2) < 0.02 and abs(rates[1] - 0.8) < 0.02


def test_diffusion_loss_is_weighted_by_inverse_t_and_normalised_by_tokens() -> None:
    ids = _ids((2, 16))
    objective = MaskedDiffusion(MASK)
    batch = objective.corrupt_at(ids, torch.tensor([0.25, 0.5]), torch.Generator().manual_seed(0))
    logits = torch.randn(2, 16, VOCAB, generator=torch.Generator().manual_seed(1))
    loss = objective.loss(logits, batch)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(2, 16)
    masked = batch.targets != IGNORE_INDEX
    expected = (ce[0][masked[0]].sum() / 0.25 + ce[1][masked[1]].sum() / 0.5) / 32
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_mlm_loss_only_on_selected_positions() -> None:
    ids = _ids((2, 32))
    objective = MaskedLM(MASK, VOCAB)
    batch = objective.corrupt(ids, torch.Generator().manual_seed(0))
    logits = torch.randn(2, 32, VOCAB)
    selected = batch.targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[selected], ids[selected])
    assert math.isclose(objective.loss(logits, batch).item(), expected.item(), rel_tol=1e-5)


def test_build_objective_rejects_unknown_names() -> None:
    assert isinstance(build_objective("clm", vocab_size=VOCAB, mask_token_id=MASK), CausalLM)
    with pytest.raises(ValueError, match=r"training\.objective"):
        build_objective("nope", vocab_size=VOCAB, mask_token_id=MASK)
