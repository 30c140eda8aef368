"""Sibling paths: the first MASK row's runner-up and the drafts after it, verified beside the
main path where the first draft fails. Layout, policy, and greedy equivalence with
`transformers` when sibling paths win, lose and win in part (their KV moved into place)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from rids.engine.cost_model import CostModel
from rids.engine.drafting import DraftingPolicy, Room, Valuation
from rids.engine.sequence import Sequence
from rids.engine.step_block import DraftPlan, StepBlock
from rids.engine.step_inputs import StepEntry
from rids.llm import LLM
from rids.sampling import SamplingParams
from tests.conftest import GPU_LIKE_COSTS, hf_greedy, noisy, oracle_drafter

MAX_NEW = 40
MILD = CostModel([1, 1024], [0.01, 0.01 + 1023 * 3e-4])  # +3 % a token


def test_a_sibling_path_takes_the_first_drafts_positions_and_sees_only_the_committed():
    # pending p at position 9, drafts d1 d2 d3, sibling d1' d2, branch B_3 of 2 MASKs
    block = StepBlock([50, 1, 2, 3, 7, 2, 0, 0], 9, 3, 2, (3,), num_sibling=2)
    assert (block.num_committed, block.first_sibling, block.sibling) == (1, 4, [7, 2])
    assert block.num_clean == 6 and block.num_verify == 4 and not block.is_causal
    assert block.positions == [9, 10, 11, 12, 10, 11, 13, 14]
    vis = block.visibility()
    assert vis[:4] == [(1, 0, -1), (2, 0, -1), (3, 0, -1), (4, 0, -1)]  # causal
    assert vis[4:6] == [(1, 4, 4), (1, 4, 5)]  # the pending token, then the path itself
    assert vis[6:] == [(4, 6, 6), (4, 6, 7)]  # B_3 sees d1..d3, not the sibling path
    assert DraftPlan(3, 2, (3,), num_sibling=2).tokens(1) == len(block.token_ids)


def seq_with(sibling_seen: tuple[int, int], rates_seen=((50, 100),) * 3) -> Sequence:
    """A decoding sequence with MASK drafts and a runner-up at hand, and its own recent
    counts of first drafts and sibling paths (accepted, verified)."""
    seq = Sequence(0, [1, 2, 3], max_new_tokens=64, stride=4)
    seq.num_cached_tokens, seq.drafts, seq.sibling_draft = 2, [5, 6, 7], 9
    seq.recent_accepted = [float(a) for a, _ in rates_seen]
    seq.recent_verified = [float(v) for _, v in rates_seen]
    seq.recent_sibling_accepted = [float(sibling_seen[0])]
    seq.recent_sibling_verified = [float(sibling_seen[1])]
    return seq


def test_a_sibling_path_is_taken_where_runner_ups_are_right_and_rows_are_cheap():
    policy = DraftingPolicy("off", cost=MILD)
    good, bad = seq_with((80, 100)), seq_with((0, 100))
    assert policy.plans([good], [1], Room())[0].num_sibling >= 1
    assert policy.plans([bad], [1], Room())[0].num_sibling == 0
    # first drafts that nearly always pass: the path is rarely tried, its rows not worth it
    sure = seq_with((80, 100), rates_seen=((98, 100),) * 3)
    plan = policy.plans([sure], [1], Room())[0]
    assert plan.masks_per_branch == 3 and plan.num_sibling == 0
    # no runner-up at hand (a copy's drafts, a probe): this step has none, whatever it is worth
    good.sibling_draft = None
    assert policy.plans([good], [1], Room())[0].num_sibling == 0
    off = DraftingPolicy("off", cost=MILD, siblings=False)
    assert off.plans([seq_with((80, 100))], [1], Room())[0].num_sibling == 0


def test_a_sampled_request_never_takes_a_sibling_path():
    seq = seq_with((80, 100))
    seq.sampling = SamplingParams(temperature=1.0)
    assert DraftingPolicy("off", cost=MILD).plans([seq], [1], Room())[0].num_sibling == 0


def test_fit_drops_the_sibling_path_where_the_step_has_no_room():
    policy = DraftingPolicy("off", cost=MILD)
    assert policy.plans([seq_with((80, 100))], [1], Room(tokens=0))[0].num_sibling == 0


def test_a_sibling_path_is_valued_as_the_tokens_it_adds_where_the_first_draft_fails():
    plan = DraftPlan(1, 1, (1,), num_sibling=1)
    one = Valuation([0.5], 1, 0, plan, sibling=1, sibling_rates=[0.4])(lambda c, m: 1.0)
    # P(d1 fails) 0.5; verify steps commit 1.5 + 0.5 x 0.4; half of the steps start cold
    assert one.reward == pytest.approx((1.5 + 0.2) / 1.5 + 0.5 / 1.5)
    # with B_0 kept, a sibling win leaves no drafts: the chain keeps them 1 - 0.2 of the time
    both = Valuation([0.5], 1, 1, plan, sibling=1, sibling_rates=[0.4])(lambda c, m: 1.0)
    keep = 0.8
    assert both.reward == pytest.approx((1.7 + (1 - keep)) / (2 - keep))


def forced_siblings(policy: DraftingPolicy, seed: int) -> None:
    """Every step with MASK drafts and a runner-up plans a sibling path of random length,
    dropped where the step has no room for it (the policy's `fit` judges)."""
    rng, fit = random.Random(seed), policy.fit

    def forced(seqs, num_uncached, plans, room):
        plans = [
            replace(p, num_sibling=rng.randint(1, p.num_drafts))
            if s.sibling_draft is not None and s.copy is None and p.num_drafts
            else p
            for s, p in zip(seqs, plans, strict=True)
        ]
        return fit(seqs, num_uncached, plans, room)

    policy.fit = forced


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("drafting", ["fixed", "adaptive"])
def test_sibling_paths_are_lossless(tiny_base, tiny_adapter, prompt_ids, kernels, drafting):
    # small pages: a moved sibling path's KV crosses page boundaries
    llm = LLM(tiny_base, tiny_adapter, page_size=4, drafting=drafting, branches="all",
              kernels=kernels)  # fmt: skip
    if llm.engine.policy.cost is not None:  # plans must not follow this machine's timings
        llm.engine.policy.cost = GPU_LIKE_COSTS
    prompts = prompt_ids if kernels == "torch" else prompt_ids[:3]
    max_new = MAX_NEW if kernels == "torch" else 16
    reference = hf_greedy(tiny_base, prompts, max_new)
    outcomes = with_siblings(llm, dict(zip(map(tuple, prompts), reference, strict=True)))
    stats = []
    for stride, batch in [(4, 1), (3, 3), (2, len(prompts)), (4, len(prompts))]:
        outs = llm.generate(prompts[:batch], max_new_tokens=max_new, stride=stride)
        assert [o.token_ids for o in outs] == reference[:batch], (stride, batch)
        stats += [o.stats for o in outs]
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages
    assert_every_outcome(outcomes)
    assert sum(s.sibling_accepted for s in stats) > 0
    assert sum(s.decode_tokens for s in stats) > 1.3 * sum(s.decode_steps for s in stats)


def test_sibling_paths_beside_stops_sampling_and_preemption(tiny_base, tiny_adapter, prompt_ids):
    """One batch: greedy requests with a stop token inside their text (it may fall inside an
    accepted sibling path), a sampled request (never given one), and a KV cache small enough
    that requests are preempted and recomputed (their blocks, sibling paths included)."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    llm.engine.policy.cost = GPU_LIKE_COSTS
    reference = hf_greedy(tiny_base, prompt_ids, MAX_NEW)
    outcomes = with_siblings(llm, dict(zip(map(tuple, prompt_ids), reference, strict=True)))
    stops = [r[min(10, len(r) - 1)] for r in reference]
    greedy = [
        llm.make_sequence(p, max_new_tokens=MAX_NEW, stop_token_ids=[stop])
        for p, stop in zip(prompt_ids, stops, strict=True)
    ]
    sampled = llm.make_sequence(prompt_ids[0], max_new_tokens=MAX_NEW,
                                sampling=SamplingParams(temperature=1.0, seed=3))  # fmt: skip
    for seq in [*greedy, sampled]:
        llm.engine.add(seq)
    while not llm.engine.scheduler.is_finished():
        llm.engine.step()
    for seq, ref, stop in zip(greedy, reference, stops, strict=True):
        assert seq.completion_ids == ref[: ref.index(stop) + 1]
    assert llm.engine.scheduler.num_preemptions > 0
    assert sampled.completion_ids and sampled.sibling_steps == 0
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages
    assert_every_outcome(outcomes)


def test_sibling_paths_are_on_where_the_step_time_model_prices_them(tiny_base, tiny_adapter):
    assert LLM(tiny_base, tiny_adapter).engine.policy.siblings  # torch attention
    assert not LLM(tiny_base, tiny_adapter, drafting="fixed").engine.policy.siblings


def with_siblings(llm: LLM, refs: dict) -> list[tuple[int, int]]:
    """Force sibling paths into every drafted step of `llm`, with an oracle whose first drafts
    are often wrong and whose runner-ups are often right; returns the (length, tokens
    accepted) of every sibling path tried where the first draft failed, as they happen."""
    llm.engine.policy.siblings = True  # runner-ups found even where the policy would not
    forced_siblings(llm.engine.policy, seed=1)
    first_wrong, later_wrong, right = noisy(0.6, seed=2), noisy(0.3, seed=3), noisy(0.7, seed=4)
    llm.engine.drafter = oracle_drafter(
        refs, lambda seq, i: first_wrong(seq, i) if i == 0 else later_wrong(seq, i),
        sibling_right=lambda seq: right(seq, 0),  # the runner-up right 70 % of the time
    )  # fmt: skip
    outcomes, record = [], llm.engine.policy.record_sibling

    def recorded(seq, num_sibling: int, num_accepted: int) -> None:
        outcomes.append((num_sibling, num_accepted))
        record(seq, num_sibling, num_accepted)

    llm.engine.policy.record_sibling = recorded
    return outcomes


def assert_every_outcome(outcomes: list[tuple[int, int]]) -> None:
    """Sibling paths lost, won whole, and won in part (their KV moved only partly)."""
    assert any(a == 0 for _, a in outcomes)
    assert any(a == s for s, a in outcomes if s > 1)
    assert any(0 < a < s for s, a in outcomes)


def test_runner_ups_are_found_only_when_asked(tiny_base, tiny_adapter):
    engine = LLM(tiny_base, tiny_adapter, page_size=4).engine
    block = StepBlock([5, 0, 0, 0], 8, 0, 3, (0,))  # no drafts: B_0 proposes
    table = list(engine.pages.free_page_ids)[: engine.pages.pages_for(block.end)]
    step, logits = engine.runner.run([StepEntry(block, table)])
    verify = engine.verifier.verify
    (without,) = verify([block], step.inputs, step.dev, logits, {})
    (with_,) = verify([block], step.inputs, step.dev, logits, {}, runner_ups=True)
    assert without.second is None and with_.second is not None
    assert with_.drafts == without.drafts and with_.second != with_.drafts[0]
    ranked = logits.masks[0].argsort(descending=True)[:2].tolist()
    assert with_.second in ranked  # the first MASK row's second choice
