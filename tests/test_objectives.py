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


def test_clm_left_padding_never_predicts_nor_is_predicted() -> None:
    ids = torch.tensor([[256, 256, 256, 3, 4, 5, 6], [7, 8, 9, 10, 256, 256, 256]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    batch = CausalLM().corrupt(ids, None, mask)
    ignore = IGNORE_INDEX
    # Written by hand: a real token predicts the next real token; pads do neither.
    assert batch.targets.tolist() == [
        [ignore, ignore, ignore, 4, 5, 6, ignore],
        [8, 9, 10, ignore, ignore, ignore, ignore],
    ]


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


@pytest.mark.parametrize(
    ("mask_id", "special"),
    [(257, {256, 257, 258, 259}), (1, {0, 1, 2, 3})],  # the byte tokenizer's; a BPE's
)
def test_mlm_random_replacements_never_draw_special_ids(mask_id: int, special: set[int]) -> None:
    ids = _ids((256, 1024)) + (4 if mask_id == 1 else 0)  # real tokens only
    objective = MaskedLM(mask_id, VOCAB, 0.15, special_ids=special)
    batch = objective.corrupt(ids, torch.Generator().manual_seed(2))
    selected = batch.targets != IGNORE_INDEX
    replaced = selected & (batch.inputs != mask_id) & (batch.inputs != ids)
    drawn = batch.inputs[replaced].tolist()
    assert len(drawn) > 3500  # 10 % of the ~39,000 selected tokens, less chance repeats
    counts = {token: drawn.count(token) for token in special}
    assert counts == dict.fromkeys(special, 0)
    # ... and the draw still covers the rest of the vocabulary.
    assert len(set(drawn)) == VOCAB - len(special)


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


def test_diffusion_trains_on_t_from_epsilon_to_1_by_default() -> None:
    ids = _ids((4096, 64))
    batch = MaskedDiffusion(MASK).corrupt(ids, torch.Generator().manual_seed(4))
    assert batch.weights is not None
    has_mask = batch.weights.max(dim=1).values > 0
    t = 1.0 / batch.weights.max(dim=1).values[has_mask]
    assert ((t >= 1e-3) & (t <= 1.0)).all()
    # U(0.001, 1]: a tenth of the sequences above 0.9 (generation starts from t = 1), and
    # some near 0, where the 1/t weight is large.
    assert abs((t > 0.9).float().mean().item() - 0.1) < 0.02
    assert (t < 0.05).any() and t.max().item() > 0.99


def test_diffusion_eval_uses_the_midpoint_nodes() -> None:
    ids = _ids((16, 1024))
    objective = MaskedDiffusion(MASK, eval_points=4)
    entries = objective.eval_corruptions(ids, torch.Generator().manual_seed(0))
    rates = [(e.targets != IGNORE_INDEX).float().mean().item() for e in entries]
    expected = [0.125, 0.375, 0.625, 0.875]  # (k - 1/2) / 4
    assert len(rates) == 4
    assert all(abs(r - e) < 0.02 for r, e in zip(rates, expected, strict=True))


def test_diffusion_validation_nelbo_is_the_integral_over_0_1() -> None:
    """An oracle whose NELBO is known in closed form.

    Every row is one token repeated twice. The oracle knows a row's token as soon as one copy is
    visible (loss 0), and is uniform over V ids when both are masked (loss ln V each). At mask
    ratio t the 1/t-weighted loss per token is then E[2 ln V 1{both masked}] / (2t) = t ln V,
    whose integral over (0, 1] is ln(V) / 2 nats per token.
    """
    vocab, mask = 16, 15
    rows = 200_000
    ids = torch.randint(0, 15, (rows, 1), generator=torch.Generator().manual_seed(0))
    ids = ids.expand(rows, 2).contiguous()

    def oracle(inputs: torch.Tensor) -> torch.Tensor:
        visible = inputs != mask
        known = torch.where(visible, inputs, torch.zeros_like(inputs)).max(dim=1).values
        logits = torch.zeros(rows, 2, vocab)
        certain = F.one_hot(known, vocab).float()[:, None, :].expand(rows, 2, vocab) * 60.0
        return torch.where(visible.any(dim=1)[:, None, None], certain, logits)

    objective = MaskedDiffusion(mask)
    entries = objective.eval_corruptions(ids, torch.Generator().manual_seed(1))
    metrics = objective.eval_metrics([float(objective.loss(oracle(e.inputs), e)) for e in entries])
    exact = math.log(vocab) / 2
    assert math.isclose(metrics["val/nelbo"], exact, rel_tol=0.01), (metrics, exact)
    assert metrics["val/loss"] == metrics["val/nelbo"]
    assert math.isclose(metrics["val/ppl_bound"], math.exp(metrics["val/nelbo"]))
    assert "val/perplexity" not in metrics


def test_eval_metric_names_per_objective() -> None:
    losses = [2.0, 3.0]
    clm = CausalLM().eval_metrics(losses)
    assert clm == {"val/loss": 2.5, "val/perplexity": pytest.approx(math.exp(2.5))}
    assert MaskedLM(MASK, VOCAB).eval_metrics(losses) == {"val/loss": 2.5}
    assert set(MaskedDiffusion(MASK).eval_metrics(losses)) == {
        "val/loss",
        "val/nelbo",
        "val/ppl_bound",
    }


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
