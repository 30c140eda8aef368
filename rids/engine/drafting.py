"""Per sequence and step: how many drafts to verify, how many to propose, and which branches.

Every choice is lossless (verification decides what is committed); the policy only decides how
much work a step does. Its inputs are each request's running acceptance per draft position
(recent steps weigh more; a request starts from what the adapter achieves across requests) and
the device's step-time model (`rids.engine.cost_model`).

A plan at level L verifies up to L drafts and proposes L per branch; L = 0 is a plain AR step.
Branch B_j drafts what follows if exactly j drafts pass, so a rejection there costs no cold start
(`branches`: off, all, K = the K likeliest rejection points, auto = chosen here). Each level and
branch count is valued as a stationary policy of a two-state chain (the next step has drafts, or
starts cold): long-run committed tokens minus rho x the time they take, rho being the batch's
tokens per second (Dinkelbach's method for a ratio; at batch 1 this maximizes the request's
long-run tokens per second under the model: stationary acceptance rates, the measured step
times). `adaptive=False` keeps L = N-1,
the fixed I-DLM step. When L = 0 wins, a probe (L = 1) every `PROBE_EVERY` steps keeps the
estimate fresh, so drafting resumes when the text becomes draftable again. Where not even
drafts that always pass would beat a plain step at the batch's costs (`mask_drafts_can_pay`:
a large batch on a CPU, where a step costs in proportion to its rows), every free sequence
takes level 0 and nothing probes.

Drafts come from the MASK rows (adaptive, with the adapter's draft head or else its next-token
counts: each chosen among its row's likeliest tokens knowing the token before it,
`rids.engine.draft_head`, `rids.engine.next_tokens`; a request whose chooser keeps losing to its
rows' argmax where the two disagree on the first draft, as text unlike the chooser's training
can, takes the argmax drafts until the chooser wins again: `trusts_chooser`),
or are copied: from the request's own text
(`rids.engine.prompt_lookup`), replacing the MASK drafts when its match is at least
COPY_OVER_MASK tokens long, or from the adapter's corpus of the base's earlier answers
(`rids.engine.draft_corpus`), when its continuation is expected to pass more drafts than the MASK
proposals would at the request's rates; a shorter match in the text is taken where there are no
MASK drafts (a cold start, a plain AR step) and the corpus has nothing. A copy comes with its own
pass rates (the corpus' shares scaled by the trust its copies earned; the record of text copies),
and a step that verifies one is planned one step ahead at those rates: how many copied drafts to
verify, how many MASKs to propose and after which of them (`copy_plan`). Copies do not enter
the MASK acceptance estimates.

A greedy step with MASK drafts may also verify a sibling path (`rids.engine.step_block`): the
first MASK row's second choice and the drafts after it, a second candidate tried where the
first draft fails. It is valued like a branch, at its own running pass rates: its expected
extra tokens against its clean rows' time; after it wins the next step starts cold.

A seeded sampled request always takes the fixed plain step, without branches: its text must
depend on its seed alone, not on timings, on other requests, or on what fits in the step.
Copies are for greedy requests only (a copy has no proposal distribution to sample against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from rids.engine.cost_model import CostModel
from rids.engine.draft_corpus import DraftCorpus
from rids.engine.draft_head import DraftHead
from rids.engine.next_tokens import TOP_K, NextTokenCounts
from rids.engine.prompt_lookup import NgramIndex
from rids.engine.sequence import Sequence
from rids.engine.step_block import DraftPlan
from rids.errors import RidsError

PRIOR_WEIGHT = 3.0  # pseudo-observations of the adapter-wide rate behind a request's own
RECENT_DECAY = 0.95  # per observation of a position: recent text weighs more
PROBE_EVERY = 16  # steps at level 0 between probes
DINKELBACH_ROUNDS = 3
# suffix match length from which a copy replaces the MASK drafts (scripts/tune_copies.py: on
# training chats 3 and 4 tie, copies at cold starts only are a hair lower)
COPY_OVER_MASK = 3
CORPUS_PRIOR = 2.0  # pseudo-passes behind a corpus-trust estimate (a trust of 1 to start)
# behind a request's record of first drafts where its chooser and the argmax disagreed:
# pseudo-observations that the chooser was right (3 of 4: it was trained to overrule the argmax)
CHOOSER_PRIOR_WINS, CHOOSER_PRIOR_LOSSES = 3.0, 1.0
# a sibling's first token is right in about a quarter of the steps whose first draft fails
# (the embedded adapter on held-out chat at N = 4): where the rate starts
SIBLING_PRIOR = 0.25


@dataclass(frozen=True, slots=True)
class Copy:
    """Copied drafts, the rate at which each is expected to pass given the ones before it
    did, and, from the corpus, the passes it expects of the first 1, 2, .. of them (empty:
    from the text)."""

    drafts: list[int]
    rates: list[float]
    corpus_expected: list[float] = field(default_factory=list)


def parse_branches(mode: str | int) -> str | int:
    if isinstance(mode, int) or str(mode).isdigit():
        k = int(mode)
        if k < 0:
            raise RidsError(f"--branches K must be >= 0, got {k}")
        return k
    if mode not in ("off", "all", "auto"):
        raise RidsError(f"--branches must be off, all, auto or a number, got {mode!r}")
    return mode


def record_acceptance(
    verified: list[float], accepted: list[float], num_drafts: int, num_accepted: int,
    decay: float = 1.0,
) -> None:  # fmt: skip
    """Per draft position: a check for every draft that was checked (those before the first
    rejection, and that one) and a pass for each accepted draft; older counts decay."""
    for i in range(min(num_accepted + 1, num_drafts)):
        if i == len(verified):
            verified.append(0)
            accepted.append(0)
        if decay != 1.0:
            verified[i] *= decay
            accepted[i] *= decay
        verified[i] += 1
        accepted[i] += int(i < num_accepted)


@dataclass(frozen=True, slots=True)
class Option:
    """A stationary choice for one sequence: its value terms and the plan of this step."""

    reward: float  # long-run committed tokens per step
    seconds: float  # long-run seconds per step attributed to this sequence
    plan: DraftPlan
    level: int  # drafts proposed (and verified) per step in the long run


@dataclass
class Room:
    """What the scheduler left for this step: tokens and KV pages beyond the plain blocks."""

    tokens: float = float("inf")
    pages: int = 1 << 62
    pages_for: Callable[[Sequence, int], int] = lambda seq, tokens: 0  # new pages a block needs


@dataclass
class DraftingPolicy:
    branches: str | int = "auto"
    adaptive: bool = True
    cost: CostModel | None = None  # needed by adaptive and auto; None: plain steps
    prompt_lookup: bool | None = None  # copies from the request's text; None: if adaptive
    siblings: bool | None = None  # sibling paths where they pay; None: if adaptive
    # copies from the base's earlier answers (the adapter's; with prompt_lookup only)
    corpus: DraftCorpus | None = None
    # to choose MASK drafts with (the adapter's; adaptive): a draft head, else counts of what
    # the base wrote next
    draft_head: DraftHead | None = None
    next_tokens: NextTokenCounts | None = None
    corpus_passed: float = 0.0  # adapter-wide: drafts corpus copies passed ...
    corpus_predicted: float = 0.0  # ... and the passes the corpus expected of them
    verified: list[float] = field(default_factory=list)  # adapter-wide, per draft position
    accepted: list[float] = field(default_factory=list)
    text_verified: list[float] = field(default_factory=list)  # copies from the text, likewise
    text_accepted: list[float] = field(default_factory=list)
    sibling_verified: list[float] = field(default_factory=list)  # sibling paths, likewise
    sibling_accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prompt_lookup is None:
            self.prompt_lookup = self.adaptive
        if self.siblings is None:
            self.siblings = self.adaptive

    def record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        record_acceptance(self.verified, self.accepted, num_drafts, num_accepted)
        record_acceptance(
            seq.recent_verified, seq.recent_accepted, num_drafts, num_accepted, RECENT_DECAY
        )

    def record_sibling(self, seq: Sequence, num_sibling: int, num_accepted: int) -> None:
        """A sibling path verified where the first draft failed, and its tokens that passed."""
        record_acceptance(self.sibling_verified, self.sibling_accepted, num_sibling, num_accepted)
        record_acceptance(
            seq.recent_sibling_verified, seq.recent_sibling_accepted, num_sibling, num_accepted,
            RECENT_DECAY,
        )  # fmt: skip

    def copied_drafts(self, seq: Sequence, proposals: list[int]) -> Copy | None:
        """Drafts copied from the request's text or the corpus to take instead of the MASK
        `proposals` (None: keep the proposals). A long match in the text wins; then the
        corpus, where its continuation is expected to pass more drafts than the proposals."""
        if not self.prompt_lookup or seq.stride == 1 or not seq.sampling.greedy:
            return None
        if seq.ngrams is None:
            seq.ngrams = NgramIndex()
        copy, match = seq.ngrams.lookup(seq.token_ids, seq.stride - 1)
        if copy and match >= COPY_OVER_MASK:
            return self.text_copy(copy)
        if self.corpus is not None:
            drafts, expected = self.corpus.lookup(seq.token_ids, seq.stride - 1)
            trust = self.corpus_trust(seq)
            if drafts and expected[-1] * trust > self.expected_passes(seq, len(proposals)):
                return Copy(drafts, corpus_rates(expected, trust), expected)
        return self.text_copy(copy) if copy and not proposals else None

    def text_copy(self, drafts: list[int]) -> Copy:
        """A copy from the request's text, at the rates text copies have passed so far."""
        return Copy(drafts, smoothed(self.text_verified, self.text_accepted, len(drafts)))

    def set_draft_sources(
        self,
        corpus: DraftCorpus | None,
        next_tokens: NextTokenCounts | None = None,
        draft_head: DraftHead | None = None,
    ) -> None:
        """Copy from `corpus` and choose MASK drafts with `draft_head`, else `next_tokens`,
        from now on, with no record of the corpus yet (trust starts at 1)."""
        self.corpus, self.corpus_passed, self.corpus_predicted = corpus, 0.0, 0.0
        self.next_tokens, self.draft_head = next_tokens, draft_head

    @property
    def chooser(self) -> DraftHead | NextTokenCounts | None:
        """What chooses MASK drafts among their rows' likeliest tokens (None: the argmax)."""
        if not self.adaptive:
            return None
        if self.draft_head is not None:
            return self.draft_head
        return self.next_tokens if self.next_tokens is not None and len(self.next_tokens) else None

    @property
    def num_candidates(self) -> int:
        """Likeliest tokens per MASK row that verification finds, to choose drafts among
        (0: the argmax is the draft)."""
        return 0 if self.chooser is None else TOP_K

    def record_choices(self, seq: Sequence, token: int) -> None:
        """The base's `token` where the request's chooser and argmax proposed first drafts: a
        win for the one that proposed it, where they disagreed (whichever was the draft)."""
        if seq.first_choices is None:
            return
        chosen, argmax = seq.first_choices
        if chosen != argmax and token in seq.first_choices:
            seq.chooser_wins = seq.chooser_wins * RECENT_DECAY + (token == chosen)
            seq.argmax_wins = seq.argmax_wins * RECENT_DECAY + (token == argmax)

    def trusts_chooser(self, seq: Sequence) -> bool:
        """Whether the request's MASK drafts are its chooser's (else its rows' argmax): where
        the two disagreed, the chooser's first draft was the base's at least as often as the
        argmax's, over a prior that it is right in 3 of 4."""
        wins = seq.chooser_wins + CHOOSER_PRIOR_WINS
        return wins >= seq.argmax_wins + CHOOSER_PRIOR_LOSSES

    def record_copy(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """A verified copy: how many of its first `num_drafts` drafts passed (for a corpus
        copy, against how many of them it expected to)."""
        assert seq.copy is not None
        if not seq.copy.corpus_expected:
            record_acceptance(self.text_verified, self.text_accepted, num_drafts, num_accepted)
        elif num_drafts:
            expected = seq.copy.corpus_expected[num_drafts - 1]
            self.corpus_passed += num_accepted
            self.corpus_predicted += expected
            seq.corpus_passed = seq.corpus_passed * RECENT_DECAY + num_accepted
            seq.corpus_predicted = seq.corpus_predicted * RECENT_DECAY + expected

    def corpus_trust(self, seq: Sequence) -> float:
        """Drafts that corpus copies pass per draft the corpus expects to: the request's own
        record over the adapter-wide one (the corpus' expectations are measured on the answers
        it was built from: new text falls short of them, text unlike any answer far short)."""
        adapter = (self.corpus_passed + CORPUS_PRIOR) / (self.corpus_predicted + CORPUS_PRIOR)
        return (seq.corpus_passed + CORPUS_PRIOR * adapter) / (seq.corpus_predicted + CORPUS_PRIOR)

    def expected_passes(self, seq: Sequence, num: int) -> float:
        """Drafts expected to pass of `num` MASK proposals, at the request's rates."""
        return expected_passes(self.rates(seq)[:num])

    def draft_rates(self, seq: Sequence) -> list[float]:
        """The pass rates of the drafts at hand: a copy's own, or the MASK drafter's."""
        return self.rates(seq) if seq.copy is None else seq.copy.rates

    def rates(self, seq: Sequence) -> list[float]:
        """The request's acceptance rate of draft positions 1..N-1: its own recent counts over
        a prior, the adapter-wide rate scaled by how the request fares against it a position
        earlier; the adapter-wide rate itself backs off to the position before it where it
        has seen little (conditional rates are alike across positions, and a deeper position
        is only ever checked once the policy drafts that deep: it must not start pessimistic)."""
        adapter = smoothed(self.verified, self.accepted, seq.stride - 1)
        return blended(adapter, seq.recent_verified, seq.recent_accepted)

    def sibling_rates(self, seq: Sequence, rates: list[float]) -> list[float]:
        """The request's pass rates of sibling path positions 1..N-1 (the first: given the
        first draft failed), from the counts of sibling paths as `rates` does; the prior of
        the first scaled by how the request's first drafts fare against the adapter's (its
        `rates`: text that nothing drafts has no runner-up to offer either)."""
        adapter = smoothed(
            self.sibling_verified, self.sibling_accepted, seq.stride - 1, SIBLING_PRIOR
        )
        relative = rates[0] / smoothed(self.verified, self.accepted, 1)[0]
        recent = seq.recent_sibling_verified, seq.recent_sibling_accepted
        return blended(adapter, *recent, relative)

    def plans(self, seqs: list[Sequence], num_uncached: list[int], room: Room) -> list[DraftPlan]:
        """This step's plan for each sequence (`num_uncached`: tokens it runs besides drafts)."""
        fixed = [self.is_fixed(s) for s in seqs]
        if self.cost is None or all(fixed):
            plans = [self.fixed_plan(s) for s in seqs]
        else:
            plans = self.optimize(seqs, num_uncached, fixed)
        return self.fit(seqs, num_uncached, plans, room)

    @staticmethod
    def seeded(seq: Sequence) -> bool:
        return not seq.sampling.greedy and seq.sampling.seed is not None

    def is_fixed(self, seq: Sequence) -> bool:
        fixed_mode = not self.adaptive and self.branches != "auto"
        return seq.stride == 1 or self.seeded(seq) or fixed_mode

    def fixed_plan(self, seq: Sequence) -> DraftPlan:
        """The fixed step: every draft verified, N-1 proposed, with the mode's branches (none
        for a seeded sampled request: which ones fit would depend on the batch)."""
        k, m = len(seq.drafts), seq.stride - 1
        if self.seeded(seq):
            return DraftPlan.plain(k, seq.stride)
        return self.with_branches(seq, k, m, self.branch_count(k) or 0)

    def branch_count(self, level: int) -> int | None:
        """Extra branches (besides B_k) the mode fixes at this level; None: chosen here."""
        if self.branches == "off":
            return 0
        if self.branches == "all":
            return level
        if self.branches == "auto":
            return None
        return min(int(self.branches), level)

    def with_branches(self, seq: Sequence, k: int, m: int, extra: int) -> DraftPlan:
        """B_k plus the `extra` likeliest rejection points among j < k."""
        if m == 0:
            return DraftPlan(k, 0, ())
        likely = likeliest(exactly(self.draft_rates(seq)[:k]), extra)
        return DraftPlan(k, m, (*sorted(likely), k))

    def optimize(
        self, seqs: list[Sequence], num_uncached: list[int], fixed: list[bool]
    ) -> list[DraftPlan]:
        """Each free sequence's best option for the batch's rate rho (Dinkelbach: rho is the
        long-run tokens per second of the chosen options, fixed sequences' included)."""
        assert self.cost is not None
        choices = [
            [self.valued(s, self.fixed_plan(s))] if f else self.options(s)
            for s, f in zip(seqs, fixed, strict=True)
        ]
        step = sum(min(c, key=lambda o: o.tokens).tokens for c in choices) + sum(num_uncached)
        share = time_share(self.cost, step, len(seqs))  # seconds of a sequence's tokens
        # a fixed sequence proposing MASKs lowers the batch's rate below a plain step's: the
        # test below says nothing then
        fixed_masks = any(
            c[0].plan.masks_per_branch for c, f in zip(choices, fixed, strict=True) if f
        )
        hopeless = (
            self.adaptive
            and not fixed_masks
            and not mask_drafts_can_pay(share, max(s.stride for s in seqs))
        )
        if hopeless:  # level 0 for every free sequence, and no probes; copies are valued apart
            for c, f in zip(choices, fixed, strict=True):
                if not f:
                    c[:] = [o for o in c if o.level == 0]
        values = [[o(share) for o in c] for c in choices]  # rho only chooses among them
        best = [min(v, key=lambda o: o.plan.tokens(0)) for v in values]
        for _ in range(DINKELBACH_ROUNDS):
            rho = sum(b.reward for b in best) / sum(b.seconds for b in best)
            best = [max(v, key=lambda o: o.reward - rho * o.seconds) for v in values]
        plans = [
            self.copy_plan(s, v, share, rho) if s.copy is not None and not f else b.plan
            for s, v, f, b in zip(seqs, values, fixed, best, strict=True)
        ]
        return plans if hopeless else [self.probe(s, p) for s, p in zip(seqs, plans, strict=True)]

    def copy_plan(
        self, seq: Sequence, options: list[Option], time: Callable[[int, int], float], rho: float
    ) -> DraftPlan:
        """A step with copied drafts, valued one step ahead: the tokens it commits at the copy's
        rates, less rho x its time, plus, per branch, the chance its rejection point is the
        one and what level-L drafts at hand are worth next step against a cold start (the
        cold step they spare, rho x its time - its 1 token, plus one step at the level's
        long-run gain). Chooses how many copied drafts to verify (a prefix), the level and
        the branches."""
        assert seq.copy is not None
        worth: dict[int, float] = {}
        for o in options:
            worth[o.level] = max(worth.get(o.level, -rho), o.reward - rho * o.seconds)
        best, value = DraftPlan(0, 0, ()), float("-inf")
        for k in range(len(seq.drafts) + 1):
            p = exactly(seq.copy.rates[:k])
            now = sum((j + 1) * pj for j, pj in enumerate(p))
            likely = sorted(range(k + 1), key=lambda j: -p[j])
            for level, gain in worth.items():
                spared = gain + rho * time(1, level) - 1
                for branches in self.branch_sets(likely, level):
                    v = (
                        now - rho * time(1 + k, level * len(branches))
                        + spared * sum(p[j] for j in branches)
                    )  # fmt: skip
                    if v > value:
                        best, value = DraftPlan(k, level, branches), v
        return best

    def branch_sets(self, likely: list[int], level: int) -> list[tuple[int, ...]]:
        """Branch sets for a copy step whose rejection points are `likely` (likeliest first;
        the last is all drafts passing): any count of the likeliest under `auto`, else B_k
        and the mode's count of the likeliest others."""
        if not level:
            return [()]
        count = self.branch_count(level)
        if count is None:
            return [tuple(sorted(likely[:b])) for b in range(1, len(likely) + 1)]
        k = max(likely)
        return [tuple(sorted([k, *[j for j in likely if j != k][:count]]))]

    def options(self, seq: Sequence) -> list[Valuation]:
        """Every (level, extra branches) this sequence may take."""
        rates = self.rates(seq)
        k_now = len(seq.drafts)
        levels = range(seq.stride) if self.adaptive else [seq.stride - 1]
        # sibling paths where a runner-up is at hand (MASK drafts of a greedy request; without
        # one a sibling option plans this step as the option without, so planning skips them)
        siblings = self.siblings and seq.sampling.greedy and seq.sibling_draft is not None
        sibling_rates = self.sibling_rates(seq, rates) if siblings else []
        out = []
        for level in levels:
            counts = self.branch_count(level)
            for extra in range(level + 1) if counts is None else [counts]:
                # drafts at hand (a probe's, say) are verified even at level 0 (a copy's
                # are planned by `copy_plan`)
                k = min(k_now, max(level, 1))
                plan = self.with_branches(seq, k, level, extra)
                out.append(Valuation(rates, level, extra, plan))
                for s in sorted({1, level}) if siblings and level else ():
                    # a sibling path of s tokens on every drafted step
                    with_sibling = replace(plan, num_sibling=min(s, k))
                    out.append(Valuation(rates, level, extra, with_sibling, s, sibling_rates))
        return out

    def valued(self, seq: Sequence, plan: DraftPlan) -> Valuation:
        """A fixed plan, valued like an option (its level is its MASKs per branch)."""
        level = plan.masks_per_branch
        return Valuation(self.rates(seq), level, max(len(plan.branches) - 1, 0), plan)

    def probe(self, seq: Sequence, plan: DraftPlan) -> DraftPlan:
        """At level 0, every PROBE_EVERY steps propose one draft to keep the estimate fresh."""
        if plan.masks_per_branch or seq.stride == 1:
            seq.steps_without_drafts = 0
            return plan
        seq.steps_without_drafts += 1
        if seq.steps_without_drafts < PROBE_EVERY:
            return plan
        seq.steps_without_drafts = 0
        return DraftPlan(plan.num_drafts, 1, (plan.num_drafts,))

    def fit(
        self, seqs: list[Sequence], num_uncached: list[int], plans: list[DraftPlan], room: Room
    ) -> list[DraftPlan]:
        """Drop extra branches past what the step has room for (tokens, KV pages), the least
        likely first, then the sibling path. The scheduler planned each sequence's plain
        block, so only those can overflow (a seeded request has neither)."""
        out = []
        for seq, n, plan in zip(seqs, num_uncached, plans, strict=True):
            plain = DraftPlan.plain(len(seq.drafts), seq.stride).tokens(n)
            p = exactly(self.draft_rates(seq)[: plan.num_drafts])
            while len(plan.branches) > 1 or plan.num_sibling:
                extra_tokens = plan.tokens(n) - plain
                extra_pages = room.pages_for(seq, plan.tokens(n)) - room.pages_for(seq, plain)
                if extra_tokens <= room.tokens and extra_pages <= room.pages:
                    break
                if len(plan.branches) > 1:
                    drop = min(plan.branches[:-1], key=lambda j: p[j])
                    kept = tuple(j for j in plan.branches if j != drop)
                    plan = replace(plan, branches=kept)
                else:
                    plan = replace(plan, num_sibling=0)
            room.tokens -= max(plan.tokens(n) - plain, 0)
            room.pages -= max(room.pages_for(seq, plan.tokens(n)) - room.pages_for(seq, plain), 0)
            out.append(plan)
        return out


@dataclass(frozen=True, slots=True)
class Valuation:
    """A stationary choice (`level` drafts proposed and verified each step, B_level plus the
    `extra` likeliest rejection points, a sibling path of `sibling` tokens) and this step's
    plan for it. Valued as a two-state chain, the next step with drafts or cold: rewards and
    seconds per step in the long run (the plan itself may verify fewer drafts this step, when
    fewer are at hand)."""

    rates: list[float]
    level: int
    extra: int
    plan: DraftPlan
    sibling: int = 0
    sibling_rates: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.plan.tokens(0)

    def __call__(self, time: Callable[[int, int], float]) -> Option:
        level, s = self.level, self.sibling
        p = exactly(self.rates[:level])  # P(exactly j of `level` drafts pass), j = 0..level
        reward_verify = sum((j + 1) * pj for j, pj in enumerate(p))
        keep = 1.0
        if level:
            likely = likeliest(p, self.extra)
            keep = p[-1] + sum(p[j] for j in likely)
            if s:  # tried where the first draft fails; when it wins, B_0 (if kept) is moot
                reward_verify += p[0] * expected_passes(self.sibling_rates[:s])
                if 0 in likely:
                    keep -= p[0] * self.sibling_rates[0]
        branches = self.extra + 1 if level else 0
        verify_share, cold_share = 1 / (2 - keep), (1 - keep) / (2 - keep)
        return Option(
            verify_share * reward_verify + cold_share,
            verify_share * time(1 + level + s, level * branches) + cold_share * time(1, level),
            self.plan,
            level,
        )


def smoothed(
    verified: list[float], accepted: list[float], num: int, first: float = 0.5
) -> list[float]:
    """Pass rates of draft positions 1..num from counts, each over a prior of 2 pseudo-checks
    at the rate of the position before it (`first` for the first)."""
    out, prior = [], first
    for i in range(num):
        v = verified[i] if i < len(verified) else 0
        a = accepted[i] if i < len(accepted) else 0
        prior = (a + 2 * prior) / (v + 2)
        out.append(prior)
    return out


def blended(
    adapter: list[float], verified: list[float], accepted: list[float], relative: float = 1.0
) -> list[float]:
    """A request's pass rates: its own recent counts over a prior, the adapter-wide rate
    scaled by how the request fares against it a position earlier (`relative` for the
    first)."""
    out = []
    for i, rate in enumerate(adapter):
        prior = min(rate * relative, 0.99)  # as the request fared a position earlier
        rv = verified[i] if i < len(verified) else 0
        ra = accepted[i] if i < len(accepted) else 0
        out.append((ra + PRIOR_WEIGHT * prior) / (rv + PRIOR_WEIGHT))
        relative = out[-1] / rate
    return out


def expected_passes(rates: list[float]) -> float:
    """Drafts expected to pass in a row, if draft i passes w.p. rates[i] given the ones before
    it passed."""
    out, alive = 0.0, 1.0
    for a in rates:
        alive *= a
        out += alive
    return out


def corpus_rates(expected: list[float], trust: float) -> list[float]:
    """Pass rates of a corpus copy's drafts given the ones before them passed, from its
    cumulative expected passes (the i-th difference: the chance the first i all pass), each
    chance scaled by the trust and kept below 0.99 and its predecessor."""
    out, alive, before = [], 1.0, 0.0
    for e in expected:
        chance = min((e - before) * trust, 0.99 * alive)
        out.append(chance / alive if alive > 0 else 0.0)
        alive, before = chance, e
    return out


def exactly(rates: list[float]) -> list[float]:
    """P(exactly j drafts accepted), j = 0..len(rates), if draft i passes w.p. rates[i] given
    the ones before it passed."""
    out, alive = [], 1.0
    for a in rates:
        out.append(alive * (1 - a))
        alive *= a
    return [*out, alive]


def likeliest(p: list[float], count: int) -> list[int]:
    """The `count` likeliest rejection points j < k, likeliest first, given `p` = P(exactly j
    of k drafts pass), j = 0..k (`exactly`)."""
    return sorted(range(len(p) - 1), key=lambda j: -p[j])[:count]


def mask_drafts_can_pay(time: Callable[[int, int], float], stride: int) -> bool:
    """Whether proposing and verifying L MASK drafts (L < stride) that always pass would beat
    a plain step at these costs: L + 1 tokens in time(1 + L, L) against 1 in time(1, 0). Where
    a step costs in proportion to its rows (a large batch on a CPU) none does, whatever the
    drafter: the policy then neither drafts nor probes."""
    plain = time(1, 0)
    return any((level + 1) * plain > time(1 + level, level) for level in range(1, stride))


def time_share(cost: CostModel, tokens: int, num_seqs: int) -> Callable[[int, int], float]:
    """Seconds attributed to one sequence's clean tokens and MASKs: the whole step at batch 1;
    in a batch, the step's fixed part shared evenly, its slope per token (linearized at
    `tokens`), and a share of its MASK premium."""
    if num_seqs == 1:
        return cost.time
    slope = max(cost.clean_time(tokens + 1) - cost.clean_time(tokens), 0.0)
    fixed = (cost.clean_time(tokens) - slope * tokens) / num_seqs
    return lambda clean, masks: fixed + slope * (clean + masks) + cost.premium(masks) / num_seqs
