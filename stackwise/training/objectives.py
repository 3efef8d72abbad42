"""Training objectives: what a batch is corrupted into, how its loss is computed, what is reported.

An objective turns token ids ``[B, T]`` into a `Corruption` — the model inputs, the targets
(``-100`` = no loss) and per-position loss weights — and computes a loss from logits and that
corruption. Corruption is split from the loss so that it can be drawn *once per sample* and
stored: the depth-wise trainer draws it when it builds its sample pool, runs the frozen trunk on
the corrupted inputs once (the activation cache), and reuses both for every step that visits the
sample. Random draws come from an explicit `torch.Generator`, never from the global RNG, so the
cached and the uncached paths see exactly the same masks. `eval_metrics` turns the losses of the
validation entries into the metrics each objective reports.

- ``clm``: next-token prediction; position i predicts token i+1 when both are real tokens
  (padding never predicts and is never predicted; the last position has no target). Mean
  cross-entropy over predicted positions. Reports ``val/loss`` and ``val/perplexity``.
- ``mlm``: BERT masking; each real token is selected with probability ``mlm_probability``
  (0.15); a selected token becomes [MASK] with probability 0.8, a uniformly random *non-special*
  token with 0.1, and stays unchanged with 0.1. Mean cross-entropy over selected positions,
  reported as ``val/loss`` (masked-token loss; not a perplexity of any distribution).
- ``diffusion``: masked-diffusion LM (MDLM / LLaDA) with the linear schedule: per sequence a
  mask ratio ``t ~ U[mask_ratio_min, mask_ratio_max]`` (default ``U[1e-3, 1]``, i.e. t ~ U(ε, 1]);
  each real token is replaced by [MASK] with probability t; the loss is
  ``sum over masked positions of CE / t``, divided by the number of real tokens in the batch —
  an unbiased estimate of the negative ELBO per token,
  ``NELBO = E_t[(1/t) sum_masked CE] / L = integral over (0, 1] of the expected masked-token CE
  at ratio t``. Validation computes that integral with the midpoint rule over
  ``training.eval.diffusion_t_points`` = K equal cells, ``t_k = (k - 1/2) / K``, one mask draw
  per batch and node from a fixed-seed generator; it reports ``val/nelbo`` (nats per token,
  also ``val/loss``) and ``val/ppl_bound = exp(nelbo)``, an upper bound on the perplexity.

Padding (``attention_mask == 0``) is never selected and never a target.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from stackwise.config.base import TrainingConfig

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

    def eval_metrics(self, losses: Sequence[float]) -> dict[str, float]:
        """The validation metrics from the losses of the `eval_corruptions` entries.

        Every objective reports ``val/loss``, the mean over the entries; the others add what that
        mean is an estimate of (see the module docstring).
        """
        return {"val/loss": _mean(losses)}


def _mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no validation losses to average")
    return sum(values) / len(values)


def _exp(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # beyond e^50 the value says nothing more


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
            # A pair (i, i+1) is trained only when both are tokens: with left padding the last
            # pad must not predict the first token, with right padding no token predicts a pad.
            pair = valid[:, :-1] & valid[:, 1:]
            targets[:, :-1].masked_fill_(~pair, IGNORE_INDEX)
        return Corruption(input_ids, targets, None, attention_mask)

    def eval_metrics(self, losses: Sequence[float]) -> dict[str, float]:
        loss = _mean(losses)
        return {"val/loss": loss, "val/perplexity": _exp(loss)}


class MaskedLM(Objective):
    """BERT-style masked LM: 15% selected; of those 80% [MASK], 10% random, 10% unchanged.

    Random replacements are drawn uniformly from the ids that are not special tokens
    (`special_ids`, which always include `mask_token_id`).
    """

    name = "mlm"

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        probability: float = 0.15,
        special_ids: Iterable[int] = (),
    ) -> None:
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.probability = probability
        excluded = {int(i) for i in special_ids} | {mask_token_id}
        allowed = [i for i in range(vocab_size) if i not in excluded]
        if not allowed:
            raise ValueError("mlm: every id of the vocabulary is a special token")
        self.replacement_ids = torch.tensor(allowed, dtype=torch.long)

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
        choice = torch.randint(0, len(self.replacement_ids), shape, generator=generator)
        random_tokens = self.replacement_ids[choice]
        selected = selected.to(device) & _valid(input_ids, attention_mask)
        action, random_tokens = action.to(device), random_tokens.to(device)
        inputs = input_ids.clone()
        inputs[selected & (action < 0.8)] = self.mask_token_id
        use_random = selected & (action >= 0.8) & (action < 0.9)
        inputs[use_random] = random_tokens[use_random]
        targets = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return Corruption(inputs, targets, None, attention_mask)


class MaskedDiffusion(Objective):
    """Masked-diffusion LM with per-sequence mask ratio t and 1/t-weighted loss.

    Training draws ``t ~ U[t_min, t_max]``; validation integrates over (0, 1] with the midpoint
    rule on `eval_points` equal cells (`eval_t`).
    """

    name = "diffusion"

    def __init__(
        self,
        mask_token_id: int,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        eval_points: int = 8,
    ) -> None:
        if not 0.0 < t_min < t_max <= 1.0:
            raise ValueError(f"diffusion: need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        if eval_points < 1:
            raise ValueError(f"diffusion: eval_points must be at least 1, got {eval_points}")
        self.mask_token_id = mask_token_id
        self.t_min = t_min
        self.t_max = t_max
        self.eval_points = eval_points

    @property
    def eval_t(self) -> list[float]:
        """Midpoint-rule nodes ``(k - 1/2) / K`` of the NELBO integral over (0, 1]."""
        return [(k + 0.5) / self.eval_points for k in range(self.eval_points)]

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
            for t in self.eval_t
        ]

    def eval_metrics(self, losses: Sequence[float]) -> dict[str, float]:
        # Each batch is scored once at every node, so the plain mean is the midpoint rule.
        nelbo = _mean(losses)
        return {"val/loss": nelbo, "val/nelbo": nelbo, "val/ppl_bound": _exp(nelbo)}


def build_objective(
    name: str,
    *,
    vocab_size: int,
    mask_token_id: int,
    mlm_probability: float = 0.15,
    special_ids: Iterable[int] = (),
    t_min: float = 1e-3,
    t_max: float = 1.0,
    eval_points: int = 8,
) -> Objective:
    """The objective called `name` (`clm`, `mlm` or `diffusion`).

    `special_ids` are the tokenizer's special tokens, never drawn as mlm random replacements.
    """
    if name == "clm":
        return CausalLM()
    if name == "mlm":
        return MaskedLM(mask_token_id, vocab_size, mlm_probability, special_ids)
    if name == "diffusion":
        return MaskedDiffusion(mask_token_id, t_min, t_max, eval_points)
    raise ValueError(f"training.objective: unknown objective {name!r} (clm, mlm, diffusion)")


def training_objective(
    training: TrainingConfig, vocab_size: int, mask_token_id: int | None = None
) -> Objective:
    """The objective a run trains with: ``training.objective`` and its settings. [MASK] is
    `mask_token_id`, else the byte tokenizer's for its vocabulary of 260, else the vocabulary's
    last id; the tokenizer's special tokens are never drawn as mlm replacements."""
    from stackwise.config.base import BYTE_VOCAB_SIZE
    from stackwise.data.tokenizer import ByteTokenizer, special_ids_for

    mask_id = mask_token_id
    if mask_id is None:
        mask_id = ByteTokenizer.mask_id if vocab_size == BYTE_VOCAB_SIZE else vocab_size - 1
    return build_objective(
        training.objective,
        vocab_size=vocab_size,
        mask_token_id=mask_id,
        mlm_probability=training.mlm_probability,
        special_ids=special_ids_for(vocab_size, mask_id),
        t_min=training.mask_ratio_min,
        t_max=training.mask_ratio_max,
        eval_points=training.eval.diffusion_t_points,
    )
