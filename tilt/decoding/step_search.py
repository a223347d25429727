"""E6 Q-guided step search for a causal LM: a learned step Q, an LM step proposer, best-first search.

Q* (Wang et al., arXiv:2406.14283) casts multi-step reasoning as search over partial solutions: a
node is the prompt plus the steps written so far, it is expanded by letting the LM propose candidate
next steps (§4.2: the top-K steps of the policy; here k samples of pi_ref, each up to a step
delimiter), and the open node with the highest f = g + lambda·h is expanded next (§3.2 / §4.2), h
being a learned Q of the last step. Pieces, each pure of trainer state:

* ``step_ends`` / ``collect_step_data`` / ``train_step_q``: the step Q. pi_ref completions are split
  into steps at delimiter tokens (and the last token); the example of a step is (hidden state before
  its last token, that token, a label). The label is the Monte-Carlo return of the outcome reward
  from that step under pi_ref: the completion's own reward (one roll-out), or the mean or the max
  (Q*'s "learning from roll-out" label, §4.1) over K fresh roll-outs after the step. The model is
  ``QHead``: a linear head on pi_ref's last hidden state fit by binary cross-entropy, so
  sigmoid(head) -> E_{pi_ref}[r | prefix, step] (the regression target's minimiser).
* ``propose_steps``: k pi_ref samples of the next step from one partial solution.
* ``q_step_search``: best-first search over steps with a node budget (``tilt.decoding.search``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from tilt.decoding.search import best_first_search
from tilt.decoding.value_model import QHead


def delimiter_ids(tokenizer, delimiters: str) -> frozenset[int]:
    """Ids of the tokens whose text contains one of the ``delimiters`` characters (each ends a step)."""
    if not isinstance(delimiters, str) or not delimiters:
        raise ValueError(f"step delimiters must be a non-empty string of characters, got {delimiters!r}")
    vocab = tokenizer.get_vocab()
    ids = frozenset(i for i in vocab.values() if any(c in tokenizer.decode([i]) for c in delimiters))
    if not ids:
        raise ValueError(f"no token of the tokenizer contains any of the step delimiters {delimiters!r}")
    return ids


def step_ends(completion_ids: Tensor, completion_mask: Tensor, *, delimiters: frozenset[int]) -> Tensor:
    """[N, T] bool: token t closes a step (a delimiter, or the last generated token: EOS or truncation)."""
    mask = completion_mask.bool()  # [N, T]
    delim = torch.isin(completion_ids, torch.tensor(sorted(delimiters), dtype=completion_ids.dtype)) & mask
    last = torch.zeros_like(mask)
    lengths = mask.sum(-1)  # [N]
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    last[rows, lengths[rows] - 1] = True
    return delim | last


def step_examples(completion_ids: Tensor, completion_mask: Tensor, rewards: Tensor, states: Tensor, *,
                  delimiters: frozenset[int]):
    """Step-Q examples of completions [N, T] with outcome rewards [N] and states [N, T, H] (the state before
    token t): one per step, (state before the step's last token, that token, label = the completion's
    reward, the Monte-Carlo return of the outcome reward from that step). Returns a ``ValueData``."""
    from tilt.decoding.train_value import ValueData

    n, t = torch.nonzero(step_ends(completion_ids, completion_mask, delimiters=delimiters), as_tuple=True)
    return ValueData(states[n, t].float(), completion_ids[n, t], rewards[n].float())


def rollout_labels(rewards: Tensor, *, kind: str) -> Tensor:
    """Step labels [M] from the outcome rewards [M, K] of K roll-outs after each step.

    "mean": the Monte-Carlo estimate of E_{pi_ref}[r | prefix, step]; "max": Q*'s "learning from
    roll-out" label with an outcome-only reward and gamma = 1 (arXiv:2406.14283 §4.1: the best of the
    roll-outs), an estimate of the best reward pi_ref reaches from there in K tries."""
    if kind == "mean":
        return rewards.float().mean(-1)
    if kind == "max":
        return rewards.float().amax(-1)
    raise ValueError(f"step-Q label kind {kind!r} is not one of: mean, max")


@torch.no_grad()
def _rollout_rewards(policy, rows, batch, n: Tensor, t: Tensor, *, rollouts: int, max_new_tokens: int,
                     generator: torch.Generator) -> Tensor:
    """Outcome rewards [M, rollouts] of pi_ref continuations after the step ends (n, t) of ``batch``; a
    continuation is cut where the whole completion reaches ``max_new_tokens``."""
    from tilt.rewards import verifier_reward
    from tilt.rollout import SamplingParams, continue_from

    tok, eos = policy.tokenizer, policy.eos_id
    rep_n, rep_t = n.repeat_interleave(rollouts), t.repeat_interleave(rollouts)  # [M*K]
    prefix_mask = (torch.arange(batch.completion_ids.shape[1])[None] <= rep_t[:, None]).long()  # [M*K, T]
    out = continue_from(policy.model, batch.prompt_ids[rep_n], batch.prompt_mask[rep_n], batch.completion_ids[rep_n],
                        prefix_mask, params=SamplingParams(max_new_tokens, 1.0), eos_id=eos, pad_id=policy.pad_id,
                        generator=generator)
    texts = []
    for i in range(len(rep_n)):
        pre = batch.completion_ids[rep_n[i], :rep_t[i] + 1].tolist()
        ids = pre + out.completion_ids[i][out.completion_mask[i].bool()].tolist()[:max_new_tokens - len(pre)]
        texts.append(tok.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True))
    items = [rows[int(j)] for j in rep_n]
    r = verifier_reward([it.prompt for it in items], texts, task=[it.task for it in items],
                        columns=[it.columns for it in items])
    return torch.tensor(r, dtype=torch.float32).clamp(0, 1).reshape(len(n), rollouts)


@torch.no_grad()
def collect_step_data(policy, items, *, samples: int, delimiters: frozenset[int], max_new_tokens: int,
                      generator: torch.Generator, rollouts: int = 0, label: str = "mean"):
    """Step examples of ``samples`` pi_ref completions per item, scored by the task verifier.

    ``rollouts`` = 0: a step's label is its own completion's reward (one roll-out, ``step_examples``).
    ``rollouts`` = K >= 1: K fresh pi_ref continuations after every step that is neither at EOS nor at
    the token budget, labelled by ``rollout_labels(kind=label)`` (a finished step keeps its own reward)."""
    from tilt.rewards import verifier_reward
    from tilt.rollout import SamplingParams, completion_logits, decode_completions, encode_prompts, generate

    rollout_labels(torch.zeros(1, 1), kind=label)  # unknown kind -> error before any generation
    rows = [it for it in items for _ in range(samples)]
    ids, mask = encode_prompts(policy.tokenizer, [it.prompt for it in rows])
    batch = generate(policy.model, ids, mask, params=SamplingParams(max_new_tokens, 1.0), eos_id=policy.eos_id,
                     pad_id=policy.pad_id, generator=generator)
    texts = decode_completions(policy.tokenizer, batch, policy.eos_id)
    rewards = torch.tensor(verifier_reward([it.prompt for it in rows], texts, task=[it.task for it in rows],
                                           columns=[it.columns for it in rows]), dtype=torch.float32).clamp(0, 1)
    _, states = completion_logits(policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                  batch.completion_mask, hidden=True)  # [N, T, H] state before token t
    data = step_examples(batch.completion_ids, batch.completion_mask, rewards, states, delimiters=delimiters)
    if rollouts < 1:
        return data
    n, t = torch.nonzero(step_ends(batch.completion_ids, batch.completion_mask, delimiters=delimiters), as_tuple=True)
    live = (batch.completion_ids[n, t] != policy.eos_id) & (t + 1 < max_new_tokens)  # [M] steps with a future
    if bool(live.any()):
        r = _rollout_rewards(policy, rows, batch, n[live], t[live], rollouts=rollouts, max_new_tokens=max_new_tokens,
                             generator=generator)  # [M_live, K]
        data.rewards[live] = rollout_labels(r, kind=label)
    return data


def train_step_q(policy, items, *, samples: int = 4, delimiters: str = ",>", max_new_tokens: int = 16,
                 epochs: int = 200, lr: float = 1e-2, val_frac: float = 0.0, seed: int = 0, rollouts: int = 0,
                 label: str = "mean") -> tuple[QHead, dict]:
    """Fit a step-level Q head on pi_ref roll-outs of ``items`` (labels: ``collect_step_data``); returns
    (head, stats)."""
    from tilt.decoding.train_value import fit_head

    if samples < 1:
        raise ValueError(f"step Q needs samples >= 1 roll-outs per prompt, got {samples}")
    if rollouts < 0:
        raise ValueError(f"step Q needs rollouts >= 0 continuations per step (0 = the completion's own), "
                         f"got {rollouts}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = collect_step_data(policy, items, samples=samples, delimiters=delimiter_ids(policy.tokenizer, delimiters),
                             max_new_tokens=max_new_tokens, generator=gen, rollouts=rollouts, label=label)
    cfg = policy.model.config
    head = QHead(cfg.hidden_size, cfg.vocab_size, init_p=float(data.rewards.mean()))
    loss = fit_head(head, data, epochs=epochs, lr=lr, val_frac=val_frac, generator=gen)
    return head, {"examples": len(data.rewards), "rollout_reward": float(data.rewards.mean()), "bce": loss,
                  "kind": "step_q", "delimiters": delimiters, "rollouts": rollouts, "label": label}


@dataclass(frozen=True)
class Step:
    """One proposed step: its tokens, their pi_ref log-probs, the state before its last token."""

    tokens: tuple[int, ...]
    logps: tuple[float, ...]
    hidden: Tensor  # [H]
    ends: bool  # closed by EOS


@torch.no_grad()
def propose_steps(model, context: Tensor, *, k: int, delimiters: frozenset[int], eos_id: int, pad_id: int,
                  max_tokens: int, generator: Optional[torch.Generator] = None) -> tuple[list[Step], int]:
    """k pi_ref samples of the next step after ``context`` [L] (prompt + steps so far), each up to a
    delimiter, EOS or ``max_tokens``; returns (distinct steps in draw order, tokens generated).

    Full forward per token, no KV cache: the rows share one length, so no attention mask is needed
    (rows that ended are extended with padding that no live row attends to). Sampling and the returned
    states are on the CPU (the generator's device); the model runs wherever it lives."""
    dev = next(iter(model.parameters())).device if hasattr(model, "parameters") else context.device
    rows = context[None].repeat(k, 1).to(dev)  # [k, L]
    live = torch.ones(k, dtype=torch.bool)
    toks, lps, hid = [[] for _ in range(k)], [[] for _ in range(k)], [None] * k
    for _ in range(max_tokens):
        out = model(input_ids=rows, output_hidden_states=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()  # [k, V]
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # [k]
        h = out.hidden_states[-1][:, -1].float().cpu()  # [k, H] state before tok
        for i in torch.nonzero(live).squeeze(-1).tolist():
            toks[i].append(int(tok[i]))
            lps[i].append(float(logp[i, tok[i]]))
            hid[i] = h[i]
            if int(tok[i]) in delimiters or int(tok[i]) == eos_id:
                live[i] = False
        nxt = torch.where(live, tok, torch.full_like(tok, pad_id))[:, None].to(dev)  # [k, 1]
        rows = torch.cat([rows, nxt], 1)  # [k, L+1]
        if not bool(live.any()):
            break
    steps: dict[tuple[int, ...], Step] = {}
    for i in range(k):
        steps.setdefault(tuple(toks[i]), Step(tuple(toks[i]), tuple(lps[i]), hid[i], toks[i][-1] == eos_id))
    return list(steps.values()), sum(len(t) for t in toks)


@dataclass(frozen=True)
class Node:
    """A partial solution: completion tokens so far, their pi_ref log-probs, f = g + lambda·h, finished?"""

    tokens: tuple[int, ...]
    logps: tuple[float, ...]
    f: float
    done: bool


@dataclass
class SearchResult:
    tokens: tuple[int, ...]
    logps: tuple[float, ...]
    found: bool  # a finished solution was popped within the budget
    expansions: int
    generated_tokens: int  # every token the proposer sampled, kept or not


StepValue = Callable[[list[tuple[int, ...]], Tensor, Tensor], Tensor]


def head_step_value(head: QHead) -> StepValue:
    """h(step) = P(r = 1 | prefix, step) from a step-Q head: sigmoid(head(h_before_last))[last token]."""
    def value(_: list[tuple[int, ...]], hidden: Tensor, last: Tensor) -> Tensor:
        return head.success_probs(hidden).gather(-1, last[:, None]).squeeze(-1)  # [m]
    return value


@torch.no_grad()
def q_step_search(model, prompt: Tensor, *, value: StepValue, score: Callable[[Tensor, Tensor], Tensor], k: int,
                  max_expansions: int, max_new_tokens: int, delimiters: frozenset[int], eos_id: int, pad_id: int,
                  generator: Optional[torch.Generator] = None) -> SearchResult:
    """Best-first search from ``prompt`` [P] (no padding) over LM-proposed steps.

    ``value(completions, hidden [m, H], last [m]) -> [m]`` is h of each child (its completion tokens,
    the state before its last token, that token); ``score(h [m], log pi_ref(path) [m]) -> f [m]``.
    A node is finished at EOS or at ``max_new_tokens``. When the budget runs out before a finished
    node is popped, the highest-f finished node generated is returned, else the highest-f partial one
    (``found`` False either way).
    """
    root = Node((), (), 0.0, False)
    best = {True: None, False: None}  # finished?, highest f
    used_tokens = [0]

    def expand(node: Node) -> list[Node]:
        context = torch.cat([prompt, torch.tensor(node.tokens, dtype=prompt.dtype)])
        steps, n_tok = propose_steps(model, context, k=k, delimiters=delimiters, eos_id=eos_id, pad_id=pad_id,
                                     max_tokens=max_new_tokens - len(node.tokens), generator=generator)
        used_tokens[0] += n_tok
        full = [node.tokens + s.tokens for s in steps]
        logps = [node.logps + s.logps for s in steps]
        h = value(full, torch.stack([s.hidden for s in steps]), torch.tensor([s.tokens[-1] for s in steps]))
        f = score(h.float(), torch.tensor([sum(lp) for lp in logps]))  # [m]
        kids = [Node(t, lp, float(fi), s.ends or len(t) >= max_new_tokens)
                for t, lp, fi, s in zip(full, logps, f, steps)]
        for kid in kids:
            if best[kid.done] is None or kid.f > best[kid.done].f:
                best[kid.done] = kid
        return kids

    found, used = best_first_search(root, expand=expand, score=lambda n: n.f, is_terminal=lambda n: n.done,
                                    max_expansions=max_expansions)
    node = found if found is not None else (best[True] or best[False])
    return SearchResult(node.tokens, node.logps, found is not None, used, used_tokens[0])


def search_generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, value: StepValue,
                    score: Callable[[Tensor, Tensor], Tensor], k: int, max_expansions: int, max_new_tokens: int,
                    delimiters: frozenset[int], eos_id: int, pad_id: int,
                    generator: Optional[torch.Generator] = None):
    """``q_step_search`` for each left-padded prompt row; returns (RolloutBatch whose ``logprobs`` are the
    kept tokens' pi_ref log-probs, tokens generated by the proposer in all)."""
    from tilt.batch import RolloutBatch

    results = [q_step_search(model, ids[m.bool()], value=value, score=score, k=k, max_expansions=max_expansions,
                             max_new_tokens=max_new_tokens, delimiters=delimiters, eos_id=eos_id, pad_id=pad_id,
                             generator=generator) for ids, m in zip(prompt_ids, prompt_mask)]
    width = max(1, max(len(r.tokens) for r in results))
    ids = torch.full((len(results), width), pad_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(results), width), dtype=torch.long)  # [N, T]
    lps = torch.zeros((len(results), width))  # [N, T]
    for i, r in enumerate(results):
        ids[i, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        mask[i, :len(r.tokens)] = 1
        lps[i, :len(r.tokens)] = torch.tensor(r.logps)
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids, completion_mask=mask,
                         logprobs=lps)
    return batch, sum(r.generated_tokens for r in results)
