"""Direct Preference Optimization (Rafailov et al. 2023), as plain tensor functions.

DPO fits a policy pi to preference pairs (prompt x, chosen y_w, rejected y_l) without a reward model:
with a frozen reference pi_ref (the SFT model the policy starts from), the implicit reward of a response
is ``r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))`` and the loss is the Bradley-Terry negative
log-likelihood of preferring y_w::

    L = -log sigmoid( beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))) )

(the paper's equation 7). ``log pi(y | x)`` is the sum of the response tokens' log-probabilities; with
``length_normalize`` it is their mean instead, so that a long response is not penalised for its length
(SimPO-style averaging; the paper uses the sum).

Preference accuracy is the fraction of pairs whose chosen reward is above the rejected one, i.e. whose
log-ratio margin is positive. A tie counts one half: at step 0 the policy *is* the reference, every
margin is exactly 0, and the accuracy is 0.5 (chance) rather than 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Log-probability of each sequence's masked tokens: ``[N]`` from logits ``[N, T, V]``.

    ``labels[n, t]`` is the token predicted at position t (already shifted), ``mask[n, t]`` marks the
    response tokens that count. ``average`` divides by the number of response tokens (length
    normalisation); a sequence without response tokens gets 0.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1.0) if average else total


def response_logprobs(
    model: torch.nn.Module, tokens: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """:func:`sequence_logprobs` of ``model`` on ``tokens`` ``[N, T + 1]`` (inputs ``tokens[:, :-1]``,
    labels ``tokens[:, 1:]``, ``response_mask`` ``[N, T]``), computing logits only where a response token
    is predicted: ``[M, V]`` for the M response tokens instead of ``[N, T, V]``, which for a 50k vocabulary
    is most of the memory a batch would otherwise take.

    ``model`` is a :class:`~picomaml.model.PicoDecoder` (``hidden_states`` and ``de_embedding_proj``).
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    hidden = model.hidden_states(inputs)  # [N, T, D]
    logits = model.de_embedding_proj(hidden[response_mask]).float()  # [M, V]
    token_logps = (
        torch.log_softmax(logits, dim=-1).gather(-1, labels[response_mask].unsqueeze(-1)).squeeze(-1)
    )
    rows = torch.nonzero(response_mask, as_tuple=True)[0]
    total = torch.zeros(tokens.shape[0], dtype=token_logps.dtype, device=tokens.device)
    total = total.index_add(0, rows, token_logps)
    if average:
        total = total / response_mask.sum(-1).clamp_min(1).to(total.dtype)
    return total


class DPOOutput(NamedTuple):
    """Per pair: the DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The DPO loss of each pair from the four sequence log-probabilities (each ``[B]``).

    ``-logsigmoid`` rather than ``-log(sigmoid(.))``: the same value, without the overflow to inf that
    ``log(0)`` gives once a margin passes about -100.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return DPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per pair, 1 where the chosen score is above the rejected one, 0 below, 0.5 on a tie.

    With rewards as scores this is DPO's preference accuracy; with raw log-probabilities it is whether
    a model alone (the reference, say) already prefers the chosen response.
    """
    return (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
