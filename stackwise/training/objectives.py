"""Training objectives: what a batch is corrupted into, and how its loss is computed.

An objective turns token ids ``[B, T]`` into a `Corruption` — the model inputs, the targets
(``-100`` = no loss) and per-position loss weights — and computes a loss from logits and that
corruption. Corruption is split from the loss so that it can be drawn *once per sample* and
stored: the depth-wise trainer draws it when it builds its sample pool, runs the frozen trunk on
the corrupted inputs once (the activation cache), and reuses both for every step that visits the
sample. Random draws come from an explicit `torch.Generator`, never from the global RNG, so the
cached and the uncached paths see exactly the same masks.

- ``clm``: next-token prediction; targets are the inputs shifted left, the last position has
  none. Mean cross-entropy over predicted positions.
- ``mlm``: BERT masking; each token is selected with probability ``mlm_probability`` (0.15);
  a selected token becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and
  stays unchanged with 0.1. Mean cross-entropy over selected positions.
- ``diffusion``: masked-diffusion LM (MDLM / LLaDA): per sequence a mask ratio
  ``t ~ U[mask_ratio_min, mask_ratio_max]``; each token is replaced by [MASK] with probability t;
  the loss is ``sum over masked positions of CE / t``, divided by the number of tokens in the batch
  (an unbiased estimate of the ELBO-style objective per token). Evaluation uses a fixed grid of t
  values (``training.eval.diffusion_t_grid``) instead of random ones.

Padding (``attention_mask == 0``) is never selected and never a target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class Corruption:
    """A corrupted batch: model inputs, targets (-100 = ignored) and optional loss weights."""

    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    weights: torch.Tensor | None = None  # [B, T] float32, diffusion's 1/t on masked positions
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = token

    def to(self, device: torch.device) -> Corruption:
        return Corruption(
            self.inputs.to(device),
            self.targets.to(device),
            None if self.weights is None else self.weights.to(device),
            None if self.attention_mask is None else self.attention_mask.to(device),
        )


class Objective(ABC):
    """Base class: `corrupt` draws a corruption, `loss` scores logits against it."""

    name = "objective"

    @abstractmethod
    def corrupt(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Corruption:
        """The model input and the loss targets for `input_ids` (draws from `generator`)."""

    def loss(self, logits: torch.Tensor, batch: Corruption) -> torch.Tensor:
        """Mean cross-entropy over the target positions (float32 for stability)."""
        return F.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )

    def eval_corruptions(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator,
        attention_mask: torch.Tensor | None = None,
    ) -> list[Corruption]:
        """The corruptions a validation batch is scored under (averaged into one loss)."""
        return [self.corrupt(input_ids, generator, attention_mask)]


def _valid(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(torch.bool)


class CausalLM(Objective):
    """Next-token prediction: position i predicts token i+1; the last position has no target."""

    name = "clm"

    def corrupt(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Corruption:
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        targets[:, :-1] = input_ids[:, 1:]
        if attention_mask is not None:
            valid = _valid(input_ids, attention_mask)
            targets[:, :-1].masked_fill_(~valid[:, 1:], IGNORE_INDEX)
        return Corruption(input_ids, targets, None, attention_mask)


class MaskedLM(Objective):
    """BERT-style masked LM: 15% selected; of those 80% [MASK], 10% random, 10% unchanged."""

    name = "mlm"

    def __init__(self, mask_token_id: int, vocab_size: int, probability: float = 0.15) -> None:
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.probability = probability

    def corrupt(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Corruption:
        shape, device = input_ids.shape, input_ids.device
        # Drawn on the CPU from the explicit generator so results do not depend on the device.
        selected = torch.rand(shape, generator=generator) < self.probability
        action = torch.rand(shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, shape, generator=generator)
        selected = selected.to(device) & _valid(input_ids, attention_mask)
        action, random_tokens = action.to(device), random_tokens.to(device)
        inputs = input_ids.clone()
        inputs[selected & (action < 0.8)] = self.mask_token_id
        use_random = selected & (action >= 0.8) & (action < 0.9)
        inputs[use_random] = random_tokens[use_random]
        targets = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return Corruption(inputs, targets, None, attention_mask)


class MaskedDiffusion(Objective):
    """Masked-diffusion LM with per-sequence mask ratio t and 1/t-weighted loss."""

    name = "diffusion"

    def __init__(
        self,
        mask_token_id: int,
        t_min: float = 0.15,
        t_max: float = 0.9,
        t_grid: list[float] | None = None,
    ) -> None:
        self.mask_token_id = mask_token_id
        self.t_min = t_min
        self.t_max = t_max
        self.t_grid = list(t_grid) if t_grid else [0.15, 0.3, 0.5, 0.7, 0.9]

    def corrupt_at(
        self,
        input_ids: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None,
        attention_mask: torch.Tensor | None = None,
    ) -> Corruption:
        """Mask each token of sequence b with probability ``t[b]``."""
        device = input_ids.device
        draws = torch.rand(input_ids.shape, generator=generator).to(device)
        t = t.to(device=device, dtype=torch.float32)
        masked = (draws < t[:, None]) & _valid(input_ids, attention_mask)
        inputs = torch.where(masked, torch.full_like(input_ids, self.mask_token_id), input_ids)
        targets = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        weights = masked.to(torch.float32) / t[:, None]
        return Corruption(inputs, targets, weights, attention_mask)

    def corrupt(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Corruption:
        u = torch.rand(input_ids.shape[0], generator=generator)
        t = self.t_min + (self.t_max - self.t_min) * u
        return self.corrupt_at(input_ids, t, generator, attention_mask)

    def loss(self, logits: torch.Tensor, batch: Corruption) -> torch.Tensor:
        assert batch.weights is not None, "diffusion batches carry 1/t weights"
        per_token = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        if batch.attention_mask is None:
            n_tokens = batch.targets.numel()
        else:
            n_tokens = int(batch.attention_mask.sum().item())
        return (per_token * batch.weights.flatten()).sum() / max(1, n_tokens)

    def eval_corruptions(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator,
        attention_mask: torch.Tensor | None = None,
    ) -> list[Corruption]:
        batch = input_ids.shape[0]
        return [
            self.corrupt_at(input_ids, torch.full((batch,), t), generator, attention_mask)
            for t in self.t_grid
        ]


def build_objective(
    name: str,
    *,
    vocab_size: int,
    mask_token_id: int,
    mlm_probability: float = 0.15,
    t_min: float = 0.15,
    t_max: float = 0.9,
    t_grid: list[float] | None = None,
) -> Objective:
    """The objective called `name` (`clm`, `mlm` or `diffusion`)."""
    if name == "clm":
        return CausalLM()
    if name == "mlm":
        return MaskedLM(mask_token_id, vocab_size, mlm_probability)
    if name == "diffusion":
        return MaskedDiffusion(mask_token_id, t_min, t_max, t_grid)
    raise ValueError(f"training.objective: unknown objective {name!r} (clm, mlm, diffusion)")
