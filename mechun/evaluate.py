"""Behavioural metrics: does the model still state the fact, in each format?

* **Cloze accuracy** (:func:`answer_correct`) is teacher-forced: the prompt is followed by the answer and the answer
  counts as stated only if *every* answer token is the model's top-1 prediction at its position. For the organism's
  one-token answers this is greedy next-token accuracy; for real multi-token answers it is the usual exact match.
* **Answer log-probability** (:func:`answer_logprob`): the summed log-probability of the answer tokens.
* **Multiple choice** (:func:`mcq_correct`): the prediction is the letter A-D with the highest logit at the last
  position, compared among the four letters only (chance is 0.25).

All forwards go through the hooked model, so any intervention context that is active (``project_out``,
``add_direction``) is measured. Nothing here changes the model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechun.errors import MechunError
from mechun.models import model_device, tokenize
from mechun.organism.world import LETTERS, MCQ, Prompt, World


def _forward_logits(model: Any, ids: Tensor, mask: Tensor) -> Tensor:
    dev = model_device(model)
    return model(ids.to(dev), attention_mask=mask.to(dev)).float()


def _batched(seq: Sequence, batch_size: int):
    for i in range(0, len(seq), batch_size):
        yield seq[i:i + batch_size]


def _join(prompt: str, answer: str) -> str:
    return f"{prompt} {answer}"


@torch.inference_mode()
def answer_scores(
    model: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64
) -> tuple[Bool[Tensor, " n"], Float[Tensor, " n"]]:
    """Teacher-forced exact match and summed log-probability of each answer after its prompt."""
    if len(prompts) != len(answers):
        raise MechunError(f"got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
    if len(prompts) == 0:
        raise MechunError("empty prompt list: pass at least one prompt")
    correct, logps = [], []
    for idx in _batched(range(len(prompts)), batch_size):
        ps = [prompts[i] for i in idx]
        full_ids, full_mask = tokenize(model, [_join(p, answers[i]) for p, i in zip(ps, idx, strict=True)])
        _, p_mask = tokenize(model, ps)
        n_prompt = p_mask.sum(1)
        n_full = full_mask.sum(1)
        if bool((n_full <= n_prompt).any()):
            raise MechunError("an answer tokenised to zero tokens; pass a non-empty answer")
        logits = _forward_logits(model, full_ids, full_mask)
        logprobs = logits.log_softmax(-1)
        for b in range(len(ps)):
            pos = torch.arange(int(n_prompt[b]), int(n_full[b]), device=logits.device)
            target = full_ids[b, pos].to(logits.device)
            pred = logits[b, pos - 1].argmax(-1)
            correct.append(bool((pred == target).all()))
            logps.append(float(logprobs[b, pos - 1].gather(-1, target[:, None]).sum()))
    return torch.tensor(correct), torch.tensor(logps)


def answer_correct(model: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> Tensor:
    return answer_scores(model, prompts, answers, batch_size)[0]


def answer_logprob(model: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> Tensor:
    return answer_scores(model, prompts, answers, batch_size)[1]


def letter_token_ids(model: Any, prompt: str, letters: Sequence[str] = LETTERS) -> list[int]:
    """The token each letter becomes when it follows ``prompt`` (" A" for GPT-2's BPE, "A" for the organism)."""
    _, p_mask = tokenize(model, [prompt])
    n = int(p_mask.sum())
    ids = []
    for letter in letters:
        f_ids, f_mask = tokenize(model, [_join(prompt, letter)])
        if int(f_mask.sum()) != n + 1:
            raise MechunError(f"the letter {letter!r} is not a single token after the prompt; use another format")
        ids.append(int(f_ids[0, n]))
    return ids


@torch.inference_mode()
def mcq_correct(model: Any, questions: Sequence[MCQ], batch_size: int = 64) -> Bool[Tensor, " n"]:
    """Whether the highest-logit letter among A-D is the right one, per question."""
    if len(questions) == 0:
        raise MechunError("empty question list: pass at least one question")
    letter_ids = torch.tensor(letter_token_ids(model, questions[0].text))
    out = []
    for qs in _batched(list(questions), batch_size):
        ids, mask = tokenize(model, [q.text for q in qs])
        logits = _forward_logits(model, ids, mask)
        last = logits[torch.arange(len(qs)), mask.sum(1).to(logits.device) - 1]
        pred = last[:, letter_ids.to(logits.device)].argmax(-1).cpu()
        out.append(pred == torch.tensor([q.answer_index for q in qs]))
    return torch.cat(out)


def cloze_accuracy(model: Any, prompts: Sequence[Prompt], batch_size: int = 64) -> float:
    return float(answer_correct(model, [p.text for p in prompts], [p.answer for p in prompts], batch_size)
                 .float().mean())


def mcq_accuracy(model: Any, questions: Sequence[MCQ], batch_size: int = 64) -> float:
    return float(mcq_correct(model, questions, batch_size).float().mean())


FORMATS = ("train", "paraphrase", "mcq")


def evaluate_world(
    model: Any, world: World, domains: Sequence[str] | None = None, mcq_seed: int = 1, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Accuracy per domain and format: ``{"pathogen": {"train": .., "paraphrase": .., "mcq": ..}, ...}``.

    ``train`` uses the trained templates, ``paraphrase`` the held-out ones, ``mcq`` fresh option orders (seed
    ``mcq_seed``; the organism was trained on seed 0's orders).
    """
    result = {}
    for domain in domains or world.domains:
        result[domain] = {
            "train": cloze_accuracy(model, world.prompts(domain, "train"), batch_size),
            "paraphrase": cloze_accuracy(model, world.prompts(domain, "paraphrase"), batch_size),
            "mcq": mcq_accuracy(model, world.mcq(domain, seed=mcq_seed), batch_size),
        }
    return result


def chance_accuracy(fmt: str, world: World | None = None) -> float:
    """Chance level of a format: 1/4 for MCQ, 1/8 (one of a relation's eight values) for cloze prompts."""
    from mechun.organism.world import RELATIONS

    return 1 / len(LETTERS) if fmt == "mcq" else 1 / len(RELATIONS[0].values)


@torch.inference_mode()
def next_token_entropy(model: Any, prompts: Sequence[str], batch_size: int = 64) -> float:
    """Mean entropy (nats) of the next-token distribution at each prompt's last position."""
    out = []
    for ps in _batched(list(prompts), batch_size):
        ids, mask = tokenize(model, ps)
        logits = _forward_logits(model, ids, mask)
        last = logits[torch.arange(len(ps)), mask.sum(1).to(logits.device) - 1].log_softmax(-1)
        out.append(-(last.exp() * last).sum(-1).cpu())
    return float(torch.cat(out).mean())


@torch.inference_mode()
def continuation_nll(model: Any, judge: Any, prompts: Sequence[str], n_tokens: int = 4, batch_size: int = 64) -> float:
    """Coherence: ``model`` continues each prompt greedily for ``n_tokens``; ``judge`` (e.g. the base model, without
    interventions) scores the continuation. Mean negative log-likelihood per continuation token: junk-flooded text
    scores high, a fluent continuation low. Hooks active on ``model`` apply to the generation only if ``judge`` is
    another object."""
    total, count = 0.0, 0
    dev = model_device(model)
    for ps in _batched(list(prompts), batch_size):
        ids, mask = tokenize(model, ps)
        ids, mask = ids.to(dev), mask.to(dev)
        lengths = mask.sum(1)
        width = ids.shape[1] + n_tokens
        seq = torch.full((len(ps), width), model.tokenizer.pad_token_id, device=dev)
        seq[:, : ids.shape[1]] = ids
        full_mask = torch.zeros_like(seq)
        full_mask[:, : ids.shape[1]] = mask
        rows = torch.arange(len(ps), device=dev)
        for k in range(n_tokens):
            logits = model(seq, attention_mask=full_mask)
            nxt = logits[rows, lengths + k - 1].argmax(-1)
            seq[rows, lengths + k] = nxt
            full_mask[rows, lengths + k] = 1
        jd = model_device(judge)
        logp = judge(seq.to(jd), attention_mask=full_mask.to(jd)).float().log_softmax(-1)
        for b in range(len(ps)):
            pos = torch.arange(int(lengths[b]), int(lengths[b]) + n_tokens, device=logp.device)
            total -= float(logp[b, pos - 1].gather(-1, seq[b, pos].to(logp.device)[:, None]).sum())
            count += n_tokens
    return total / count
