"""The drafting policy: branch MASK blocks (tree mask, no cold starts), adaptive levels from
the running acceptance and the step-time model, probes, and the cost model's cache."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from rids.engine import cost_model
from rids.engine.cost_model import CostModel
from rids.engine.drafting import (
    PROBE_EVERY,
    Copy,
    DraftingPolicy,
    Room,
    corpus_rates,
    exactly,
    mask_drafts_can_pay,
    parse_branches,
    smoothed,
    time_share,
)
from rids.engine.sequence import Sequence
from rids.engine.step_block import DraftPlan
from rids.engine.step_inputs import StepEntry
from rids.errors import RidsError
from rids.llm import LLM
from rids.sampling import SamplingParams
from tests.conftest import oracle_drafter


@pytest.fixture
def refs(prompt_ids, reference) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}


def full_length(prompt_ids, reference, n):
    return [p for p, r in zip(prompt_ids, reference, strict=True) if len(r) == 48][:n]


@pytest.mark.parametrize("stride", [3, 4, 8])
def test_tree_mask_equals_each_branch_as_its_own_block(tiny_base, tiny_adapter, prompt_ids, stride):
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    pages, runner, mask = llm.engine.pages, llm.engine.runner, llm.mask_token_id
    prompt, drafts = prompt_ids[3], [7, 19, 250, 33, 41, 8, 99][: stride - 1]
    m = stride - 1

    def masks_of(branches: tuple[int, ...], seq_drafts: list[int]) -> torch.Tensor:
        seq = Sequence(0, prompt, max_new_tokens=8, stride=1)
        prefill = seq.next_block(None, DraftPlan(0, 0, ()))  # the prompt's KV into the cache
        pages.allocate(seq, prefill.end)
        runner.run([StepEntry(prefill, seq.page_table)])
        seq.num_cached_tokens, seq.stride, seq.drafts = len(prompt) - 1, stride, seq_drafts
        block = seq.next_block(mask, DraftPlan(len(seq_drafts), m, branches))
        pages.allocate(seq, block.end)
        out = runner.run([StepEntry(block, seq.page_table)])[1].masks
        pages.deallocate(seq)
        return out

    tree = masks_of(tuple(range(stride)), drafts)
    for j in range(stride):  # B_j alone: the pending token, d_1..d_j, then N-1 MASKs
        alone = masks_of((j,), drafts[:j])
        torch.testing.assert_close(tree[j * m : (j + 1) * m], alone, atol=1e-5, rtol=0)
    assert pages.num_free_pages == pages.num_pages


@pytest.mark.parametrize("stride", [3, 4, 8])
def test_branches_remove_cold_starts(tiny_base, tiny_adapter, refs, prompt_ids, reference, stride):
    prompts = full_length(prompt_ids, reference, 3)
    for i in range(stride - 1):  # drafts right up to d_i, wrong at d_{i+1}
        counts = {}
        for mode in ("off", "all"):
            llm = LLM(tiny_base, tiny_adapter, page_size=4, branches=mode, drafting="fixed")
            llm.engine.drafter = oracle_drafter(refs, wrong_at=lambda seq, k, i=i: k == i)
            outs = llm.generate(prompts, max_new_tokens=1 + 6 * (i + 1), stride=stride)
            for o in outs:
                assert o.token_ids == refs[tuple(o.prompt_token_ids)][: 1 + 6 * (i + 1)]
            counts[mode] = outs[0].stats
        # all: every step verifies B_i's drafts and commits i + 1 tokens (i drafts + correction)
        assert counts["all"].cold_starts == 0
        assert counts["all"].decode_steps == 6 and counts["all"].tpf == i + 1
        # off: a verify step (i + 1 tokens) then a cold start (1 token), again and again
        steps, cold = plain_counts(i, 6 * (i + 1))
        off = counts["off"]
        assert (off.decode_steps, off.cold_starts, off.decode_tokens) == (steps, cold, 6 * (i + 1))


def plain_counts(i: int, total: int) -> tuple[int, int]:
    """Decode steps and cold starts of plain R-ISD when drafts are right up to d_i only."""
    steps = cold = tokens = 0
    verify = True  # the prefill proposed drafts
    while tokens < total:
        tokens += min(i + 1 if verify else 1, total - tokens)
        steps, cold, verify = steps + 1, cold + (not verify), not verify
    return steps, cold


def seq_with(rates_seen: list[tuple[int, int]], stride: int = 4, drafts=(5, 6, 7)) -> Sequence:
    """A decoding sequence whose own recent counts are (accepted, verified) per position."""
    seq = Sequence(0, [1, 2, 3], max_new_tokens=64, stride=stride)
    seq.num_cached_tokens, seq.drafts = 2, list(drafts)
    seq.recent_accepted = [float(a) for a, _ in rates_seen]
    seq.recent_verified = [float(v) for _, v in rates_seen]
    return seq


def test_exactly_is_the_distribution_of_accepted_drafts():
    assert exactly([0.9, 0.2, 0.8]) == pytest.approx([0.1, 0.72, 0.036, 0.144])


def test_branch_budget_k_keeps_the_likeliest_rejection_points():
    # rates about 0.9, 0.2, 0.8: P(exactly j) = 0.1, 0.72, 0.036 for j = 0, 1, 2
    seq = seq_with([(900, 1000), (200, 1000), (800, 1000)])
    plans = {
        mode: DraftingPolicy(mode, adaptive=False).plans([seq], [1], Room())[0].branches
        for mode in (1, 2, "all", "off")
    }
    assert plans == {1: (1, 3), 2: (0, 1, 3), "all": (0, 1, 2, 3), "off": (3,)}


def test_auto_branches_follow_the_cost_model():
    """Same running acceptance (0.7, 0.6, 0.5), two cost models, opposite choices."""
    seqs = [seq_with([(700, 1000), (600, 1000), (500, 1000)]) for _ in range(4)]
    free = DraftingPolicy("auto", adaptive=False, cost=CostModel([1, 1024], [0.01, 0.01]))
    assert [p.branches for p in free.plans(seqs, [1] * 4, Room())] == [(0, 1, 2, 3)] * 4
    linear = DraftingPolicy("auto", adaptive=False, cost=CostModel([1, 1024], [1e-3, 1.024]))
    assert [p.branches for p in linear.plans(seqs, [1] * 4, Room())] == [(3,)] * 4


def test_adaptive_levels_follow_acceptance_and_cost():
    mild = CostModel([1, 1024], [0.01, 0.01 + 1023 * 3e-4])  # +3 % a token
    steep = CostModel([1, 2, 1024], [0.01, 0.02, 10.24])  # every extra token costs a step
    flat = CostModel([1, 1024], [0.01, 0.01])
    good = seq_with([(95, 100), (90, 100), (90, 100)])
    bad = seq_with([(1, 100), (1, 100), (1, 100)])
    policy = DraftingPolicy("off", cost=mild)
    assert policy.plans([good], [1], Room()) == [DraftPlan(3, 3, (3,))]  # the full stride
    assert policy.plans([bad], [1], Room())[0].masks_per_branch == 0  # AR: nothing passes
    assert DraftingPolicy("off", cost=steep).plans([good], [1], Room())[0].masks_per_branch == 0
    # free tokens: even a poor drafter proposes (it costs nothing)
    assert DraftingPolicy("off", cost=flat).plans([bad], [1], Room())[0].masks_per_branch > 0


def test_a_sequence_at_level_zero_probes_and_verifies_the_probe():
    # +30 % a token: drafts that pass pay, this sequence's (none passed) do not
    policy = DraftingPolicy("off", cost=CostModel([1, 1024], [0.01, 0.01 + 1023 * 3e-3]))
    seq = seq_with([(0, 50)], drafts=())
    plans = [policy.plans([seq], [1], Room())[0] for _ in range(PROBE_EVERY)]
    assert all(p.masks_per_branch == 0 for p in plans[:-1])
    assert plans[-1] == DraftPlan(0, 1, (0,))  # one MASK: a probe
    seq.drafts = [9]
    assert policy.plans([seq], [1], Room())[0].num_drafts == 1  # and its draft is checked


def test_where_no_mask_draft_can_pay_the_policy_neither_drafts_nor_probes():
    """Steps that cost in proportion to their rows (a large batch on a CPU): even drafts that
    always pass lose to plain steps, so none is proposed, not even a probe; copies, which need
    no MASK rows, are still verified where they pay."""
    rows = CostModel([1, 1024], [0.01, 10.24])  # every token costs as much as a step
    assert not mask_drafts_can_pay(rows.time, 4)
    assert not mask_drafts_can_pay(time_share(rows, 4, 4), 4)
    assert mask_drafts_can_pay(CostModel([1, 1024], [0.01, 0.01 + 1023 * 3e-3]).time, 4)
    policy = DraftingPolicy("auto", cost=rows)
    perfect = [seq_with([(100, 100)] * 3, drafts=()) for _ in range(4)]
    for _ in range(3 * PROBE_EVERY):
        assert all(p.masks_per_branch == 0 for p in policy.plans(perfect, [1] * 4, Room()))
    # clean rows nearly free, a MASK row as dear as a step: copies pay, MASK drafts cannot
    dear_masks = CostModel([1, 1024], [0.01, 10.24], clean=[0.01, 0.0101])
    assert not mask_drafts_can_pay(time_share(dear_masks, 4, 4), 4)
    batch = [copied([0.99] * 3) for _ in range(4)]
    plans = DraftingPolicy("auto", cost=dear_masks).plans(batch, [1] * 4, Room())
    assert plans == [DraftPlan(3, 0, ())] * 4


def test_a_seeded_request_drafting_beside_others_keeps_their_options_open():
    """A seeded sampled request always proposes its MASKs; where they never pass, it lowers
    the batch's rate below a plain step's, so the no-draft-can-pay shortcut does not apply."""
    rows = CostModel([1, 1024], [0.01, 10.24])
    seeded = seq_with([(0, 100)] * 3)
    seeded.sampling = SamplingParams(temperature=1.0, seed=0)
    sure = seq_with([(100, 100)] * 3)
    plans = DraftingPolicy("auto", cost=rows).plans([seeded, sure], [1, 1], Room())
    assert plans[0] == DraftPlan.plain(3, 4)
    assert plans[1].masks_per_branch == 3  # at the batch's rate, its perfect drafts pay


def copied(rates: list[float], mask_rates=(700, 1000)) -> Sequence:
    """A sequence whose drafts are a copy passing at `rates` (MASK drafts pass at 0.7)."""
    seq = seq_with([mask_rates] * 3)
    seq.copy = Copy(seq.drafts, rates)
    return seq


def test_copied_drafts_are_planned_at_the_copy_s_own_rates():
    mild = DraftingPolicy("auto", cost=CostModel([1, 1024], [0.01, 0.01 + 1023 * 3e-4]))
    sure = mild.plans([copied([0.95, 0.95, 0.95])], [1], Room())[0]
    assert sure.num_drafts == 3 and 3 in sure.branches  # all verified, drafting after them
    # a copy that will not pass: checking it costs more than the little it brings
    steep = DraftingPolicy("auto", cost=CostModel([1, 2, 1024], [0.01, 0.02, 10.24]))
    assert steep.plans([copied([0.02, 0.5, 0.5])], [1], Room())[0].num_drafts == 0
    # an unsure first draft on a cheap device: verify it, and branch where it fails too
    flat = DraftingPolicy("auto", cost=CostModel([1, 1024], [0.01, 0.0101]))
    plan = flat.plans([copied([0.3, 0.9, 0.9])], [1], Room())[0]
    assert plan.num_drafts == 3 and {0, 3} <= set(plan.branches)
    # the mode's branch count holds: off is B_k alone
    off = DraftingPolicy("off", cost=CostModel([1, 1024], [0.01, 0.0101]))
    assert off.plans([copied([0.3, 0.9, 0.9])], [1], Room())[0].branches == (3,)


def test_corpus_rates_turn_cumulative_passes_into_conditional_rates():
    # expected passes of the first 1, 2, 3 drafts: 0.8, 1.4, 1.7 -> P(first i pass) 0.8, 0.6, 0.3
    assert corpus_rates([0.8, 1.4, 1.7], 1.0) == pytest.approx([0.8, 0.75, 0.5])
    assert corpus_rates([0.8, 1.4, 1.7], 0.5) == pytest.approx([0.4, 0.75, 0.5])
    assert corpus_rates([0.8, 1.4, 1.7], 2.0) == pytest.approx([0.99, 0.99, 0.6 / 0.9801])
    # counts back off to the position before them; no counts: 0.5
    assert smoothed([], [], 2) == [0.5, 0.5]
    assert smoothed([10], [10], 2) == pytest.approx([11 / 12, 11 / 12])


def test_a_request_whose_chooser_keeps_losing_to_the_argmax_takes_the_argmax_until_it_wins():
    policy = DraftingPolicy()
    seq = Sequence(0, [1, 2, 3], max_new_tokens=8, stride=4)
    assert policy.trusts_chooser(seq)  # no record: the prior trusts the chooser
    seq.first_choices = (7, 9)  # the chooser's first draft 7, the argmax's 9
    for token in (7, 8, 9, 9):  # one win each way, one that neither proposed, the argmax again
        policy.record_choices(seq, token)
    assert policy.trusts_chooser(seq)  # the argmax leads by one: not enough against the prior
    policy.record_choices(seq, 9)
    policy.record_choices(seq, 9)
    assert not policy.trusts_chooser(seq)
    seq.first_choices = (5, 5)  # they agree: nothing learned either way
    policy.record_choices(seq, 5)
    policy.record_choices(seq, 6)
    assert not policy.trusts_chooser(seq)
    seq.first_choices = (7, 9)
    for _ in range(3):
        policy.record_choices(seq, 7)
    assert policy.trusts_chooser(seq)  # won back
    seq.first_choices = None  # no chooser ran (a sampled request): nothing recorded
    before = seq.chooser_wins, seq.argmax_wins
    policy.record_choices(seq, 9)
    assert (seq.chooser_wins, seq.argmax_wins) == before


def test_seeded_sampled_requests_take_the_fixed_step():
    from rids.sampling import SamplingParams

    seq = seq_with([(1, 100)])
    seq.sampling = SamplingParams(temperature=1.0, seed=3)
    policy = DraftingPolicy("auto", cost=CostModel([1, 1024], [0.01, 10.24]))
    assert policy.plans([seq], [1], Room()) == [DraftPlan.plain(3, 4)]


def test_room_limits_extra_branches_not_the_plain_block():
    seq = seq_with([(500, 1000), (500, 1000), (500, 1000)])
    policy = DraftingPolicy("all", adaptive=False)
    plan = policy.plans([seq], [1], Room(tokens=3))[0]  # one extra branch of 3 MASKs fits
    assert len(plan.branches) == 2 and plan.branches[-1] == 3
    assert policy.plans([seq], [1], Room(tokens=0))[0] == DraftPlan.plain(3, 4)


def test_adaptive_drafting_drops_to_ar_when_nothing_passes(
    tiny_base, tiny_adapter, refs, prompt_ids
):
    """Drafts that never pass: after a few steps the policy runs plain AR steps (one token a
    step), probing now and then; the output is still the base's."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4, branches="off")
    llm.engine.policy.cost = CostModel([1, 2, 1024], [0.010, 0.012, 2.0])
    llm.engine.policy.prompt_lookup = False  # MASK drafts only: copies would pass
    llm.engine.drafter = oracle_drafter(refs, wrong_at=lambda seq, i: True)
    sizes = []
    run = llm.engine.runner.run

    def recording(entries):
        sizes.append(len(entries[0].block.token_ids))
        return run(entries)

    llm.engine.runner.run = recording
    out = llm.generate([prompt_ids[0]], max_new_tokens=48, stride=4)[0]
    assert out.token_ids == refs[tuple(prompt_ids[0])][:48]
    tail = sizes[-30:]
    assert tail.count(1) >= 26, sizes  # AR steps, but for the probes and their checks


def test_step_costs_are_cached_on_disk_and_rebuilt_when_missing(tmp_path):
    calls = []

    def build() -> CostModel:
        calls.append(1)
        return CostModel([1, 2], [0.01, 0.02])

    key = {"device": "test", "model": 1}
    first = cost_model.cached(tmp_path, key, build)
    again = cost_model.cached(tmp_path, key, build)
    assert first == again and len(calls) == 1
    (file,) = tmp_path.glob("*.json")
    assert json.loads(file.read_text())["key"] == key
    file.unlink()  # safe to delete: measured again
    cost_model.cached(tmp_path, key, build)
    assert len(calls) == 2
    file.write_text("not json")
    cost_model.cached(tmp_path, key, build)  # a broken file is measured again too
    assert len(calls) == 3


def fake_clock(monkeypatch, seconds) -> tuple[list[tuple[int, int]], Callable[[int, int], None]]:
    """Steps that take `seconds(clean, masks, round)` on a fake clock (round 0 after the
    warm-up); returns the calls made."""
    clock, calls = [0.0], []
    monkeypatch.setattr(cost_model.time, "perf_counter", lambda: clock[0])

    def step(clean: int, masks: int) -> None:
        calls.append((clean, masks))
        clock[0] += seconds(clean, masks, calls.count((1, 0)) - 2)

    return calls, step


def test_measurement_shrugs_off_spikes_and_slow_spells(monkeypatch):
    def seconds(clean: int, masks: int, round: int) -> float:
        t = 0.5 + 0.1 * (clean + masks - 1) + 0.3 * masks  # a MASK costs 0.3 more
        t *= 2 if round == 1 else 1  # a slow spell: the whole round
        t *= 0.5 if (clean, masks, round) == (4, 0, 2) else 1  # a fast blip (the fastest
        # run of each size would make 4 tokens the cheapest clean step and flatten 1..4)
        return t + (5.0 if (clean, masks, round) == (3, 0, 2) else 0.0)  # one spike

    calls, step = fake_clock(monkeypatch, seconds)
    model = cost_model.measure(step, (1, 2, 3, 4, 5, 6), 3, span=10, small=4, small_rounds=5)
    assert model.tokens == [1, 2, 3, 4, 5, 6]
    assert model.clean == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert model.seconds == pytest.approx([0.5 + 0.4 * m for m in range(6)])
    # a warm-up; per round n = 1 once and the other sizes in both kinds; sizes up to 4 twice more
    assert len(calls) == 1 + 3 * (1 + 2 * 5) + 2 * (1 + 2 * 3)


def test_measurement_stops_growing_past_its_span(monkeypatch):
    calls, step = fake_clock(monkeypatch, lambda clean, masks, round: 0.5 * (1 + 2 * masks))
    model = cost_model.measure(step, (1, 2, 3, 4, 5), rounds=2, span=4.0, small_rounds=2)
    assert model.tokens == [1, 2, 3]  # 1 clean + 2 MASKs took 5 x a 1-token step
    assert (1, 3) not in calls


def test_non_decreasing_pools_what_is_out_of_order():
    assert cost_model.non_decreasing([1, 3, 2, 4, 1]) == [1, 2.5, 2.5, 2.5, 2.5]
    assert cost_model.non_decreasing([1, 2, 3]) == [1, 2, 3]


def test_mask_rows_cost_their_premium_over_clean_rows():
    cost = CostModel([1, 4, 8], [0.010, 0.016, 0.020], clean=[0.010, 0.012, 0.016])
    assert cost.time(4) == pytest.approx(0.012)  # 4 clean: verifying 3 drafts
    assert cost.time(1, 3) == pytest.approx(0.016)  # 1 clean + 3 MASKs, as measured
    # 4 clean + 3 MASKs: 7 clean tokens, plus what 3 MASKs cost over 3 clean tokens
    assert cost.time(4, 3) == pytest.approx(0.015 + 0.004)
    assert CostModel([1, 8], [0.01, 0.02]).time(4, 3) == pytest.approx(
        0.01 + 0.01 * 6 / 7
    )  # 7 tokens


def test_the_engine_measures_before_the_first_request(
    tiny_base, tiny_adapter, monkeypatch, tmp_path
):
    monkeypatch.setenv("RIDS_CACHE", str(tmp_path))
    llm = LLM(tiny_base, tiny_adapter)
    cost = llm.engine.policy.cost
    assert cost is not None and cost.tokens == list(cost_model.SIZES[: len(cost.tokens)])
    assert list((tmp_path / "step-costs").glob("*.json"))  # cached for the next start
    assert LLM(tiny_base, tiny_adapter).engine.policy.cost == cost


def test_a_kv_cache_too_small_for_every_size_measures_what_fits_and_says_so(
    tiny_base, tiny_adapter, monkeypatch, tmp_path
):
    monkeypatch.setenv("RIDS_CACHE", str(tmp_path))
    notes: list[str] = []
    monkeypatch.setattr(cost_model.logger, "info", lambda msg, *a: notes.append(msg % a))
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    cost = llm.engine.policy.cost
    assert cost is not None and 2 <= len(cost.tokens) < len(cost_model.SIZES)
    assert max(cost.tokens) + 64 <= 160  # 64 cached tokens before each timed step
    assert len(notes) == 1 and "not cached" in notes[0]
    assert not (tmp_path / "step-costs").exists()  # a partial model is measured again


def test_bad_branch_option():
    assert parse_branches("3") == 3 and parse_branches("auto") == "auto"
    with pytest.raises(RidsError, match="off, all, auto or a number"):
        parse_branches("some")
