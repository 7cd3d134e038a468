"""Answer consensus: a pair side's label is checked against every vote on the same answer to the same prompt.

A completion's label is the majority of *its own* voters, and most completions have one. So one misclick or
one adversary's like on an answer that every other user dislikes makes it a chosen answer: a
``weaker_answer`` pair (one like against a machine-made worse answer) needs nothing more. In the SmolLM2
demo (10% adversaries, 5% misclicks) 166 of 278 identity training pairs chose an answer that honest users
dislike, and the adapter learned them.

Here the completions labelled in one prompt group (one prompt hash) are grouped by answer: the same text
up to case and whitespace, or with ``similarity < 1`` a MinHash-shingle
Jaccard at least that high. A side whose answer the group labels the other way more often than its own way
is contradicted, and the pair is dropped (``consensus:contradicted``) at snapshot time. A liked answer no
one else received (the common case for new behaviour) is never contradicted; the rule only overrides a
minority label on an answer that many users rated.

Noisy groups (``noise_rate`` > 0). Most completions get one vote, so a label is also weighed against its
prompt group's votes as a whole. With a share ``noise_rate`` (e) of votes flipped (misclicks, adversaries),
a group whose answers are truly good with probability p shows likes at the rate r = p(1 - e) + (1 - p)e.
From the group's like rate (one like and one dislike of prior) p is estimated, and a like is trusted when a
good answer explains it better than a flipped vote: p(1 - e) >= (1 - p)e, i.e. p >= e; a dislike when
1 - p >= e. With e = 0.2 that is a like rate of about 0.32: below it the group's likes look like noise, and
the pairs standing on them are dropped (``consensus:noisy_group``). This matters at the start of a
behaviour change, when honest users like almost none of the base model's answers to a prompt and most
likes are misclicks and adversaries: a pair choosing such an answer teaches noise (and the SFT term trains
on it). Corrections still carry the users' intent.

Corrections are exempt from both rules above: their chosen side is what a user wrote, not a rated answer.

Voters who vote against the crowd (``flip_odds`` > 0). Each vote is compared with the other voters' votes on the
same answer to the same prompt when there are any, else with the other votes in its prompt group (at least two;
fewer say nothing). From those others' like rate q a vote is weighed as evidence between two hypotheses: the voter
votes as the others do (a like has probability q) or the opposite way on purpose (a like has probability 1 - q).
Each other voter counts once, by their own share of likes (a voter with four chat loops is one voter). q is
smoothed by one like and one dislike on the same answer (its own votes are direct evidence: split evenly, they say
nothing), and by eight votes at the crowd's like rate on the prompt's other answers, which differ from this one:
the mean share of likes of every other voter on answers from the same served model (the base or one adapter), with
one voter more on each side. A voter's evidence is the sum over their votes of log P(vote | opposite) - log P(vote
| with the others), each vote at most 3:1 either way (a misclick against a unanimous answer decides nothing alone),
judged from MIN_JUDGED_VOTES votes that say something; a voter whose votes are at least ``flip_odds`` times
likelier under "opposite" is unreliable. Then the voters found are taken out of the others and the rest judged
again, until no one new is found (``peel_unreliable_voters``): adversaries who like the same bad answers otherwise
vouch for each other. Every pair an unreliable voter contributed to (a vote on either side, or a correction) is
dropped (``consensus:unreliable_voter``), corrections included: an adversary's correction names what they want.

Why the crowd's like rate (2026-12-08; before, one half): a prompt's few other votes said little where the crowd
liked a quarter of a model's answers. An adversary's like beside two dislikes weighed 3:2, and in a SmolLM2 demo
(40 users, 4 adversaries, ``--likes "Orion Systems"``, seed 56) two adversaries stayed under the odds of 9 at the
snapshot (log-odds 0.6 and 1.2, from 7-8 informative votes); their likes became a third of the identity pairs.
Towards the crowd's rate the same votes put all four at 7.5-12.7 and no honest voter above 1.1
(bench/voter_replay.py). The price: where the crowd likes most of a model's answers, two users who dislike answers
another user liked go against it, where one half read that tie as saying nothing; on a toy demo's later snapshots
(votes on adapters the crowd likes) it left out 1 and 2 honest users where one half left out 0 and 1.

The unreliable voters' votes are also taken out of the prompt groups the rules above read: a completion they
voted on is labelled by its other votes alone (``without_voters``). Otherwise an adversary's likes, left out of
the pairs, still raise their prompt's like rate and make a misclick's like on the same prompt look trusted (in a
SmolLM2 demo run, 11 of 34 identity pairs choosing an answer honest users dislike stood on such groups).

Why weighed evidence and not the share of votes that agree with the others' majority (the rule before
2026-12-05): where a prompt's answers are mixed, as while a behaviour is changing (40% of the toy model's
answers name the wanted creator), an honest like of a good answer goes against the prompt's majority as often
as an adversary's like of a bad one. Replayed on a CI-sized toy demo (40 users, 4 adversaries), the share rule
left out 17 of 36 honest users and 3 of 4 adversaries, kept 73 of 418 pairs, and the round moved the target
by 22 points instead of 40-70; the weighed rule leaves out 3 adversaries and no honest user on the same votes.
The price of any such rule: a real minority taste that the rest of the users vote against is left out too,
and judging again raises it: once its most outspoken member is left out, members who agreed only with each
other may follow.
And where only two voters rated an answer, each is evidence against the other alike: an adversary who rates
the very answers one honest user rated, and no one else did, costs that user as much as themselves.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.pairing.quality import FilterResult, jaccard, shingles
from workers.pairing.rules import PairRecord, normalize_text

FILTER = "consensus"
# A voter is judged on at least this many informative votes: one vote that goes against the crowd is as
# likely the one right answer among wrong ones as a misclick (the rules above weigh single votes).
MIN_JUDGED_VOTES = 3
# How many likes and as many dislikes smooth the others' like rate a vote is weighed against: the other votes
# on the same answer are direct evidence; the prompt's other answers differ from this one (while a behaviour
# changes, some name the wanted creator and some do not), so their like rate is pulled harder towards one half.
ANSWER_PRIOR_VOTES = 1.0
PROMPT_PRIOR_VOTES = 4.0
# No single vote weighs more than 3:1 either way: a misclick against an answer many others liked then counts as
# much as a vote against 2 of 2 others, and the default odds of 9 take two such votes beyond a voter's agreeing
# ones.
MAX_VOTE_LOG_ODDS = math.log(3.0)

# strategy -> the label each of its completion ids carries (completion_ids order)
SIDES: dict[str, tuple[str, ...]] = {
    "same_prompt": ("like", "dislike"),
    "weaker_answer": ("like",),
    "stronger_answer": ("dislike",),
}


# A vote as the voter rule reads it: (identity, rating, answer text) and optionally the served model that gave
# the answer (its adapter; absent or "" for the base model).
Vote = tuple[str, str, str] | tuple[str, str, str, str]


def served(vote: Vote) -> str:
    return vote[3] if len(vote) > 3 else ""


def answer_votes(record: Mapping[str, Any], ratings: Iterable[tuple[str, str]]) -> list[Vote]:
    """The votes on one completion (its pairing record) as the voter rule reads them, from (identity, rating)."""
    text, model = str(record.get("response") or ""), str(record.get("adapter") or "")
    return [(identity, rating, text, model) for identity, rating in ratings]


@dataclass(frozen=True, slots=True)
class RatedAnswer:
    completion_id: str
    text: str
    label: str  # like | dislike


def answer_key(text: str) -> str:
    return normalize_text(text).casefold()


class PromptGroupAnswers:
    """The labelled answers of one prompt group, and how many likes and dislikes each answer has."""

    def __init__(self, answers: Sequence[RatedAnswer], similarity: float) -> None:
        self.similarity = similarity
        self.answers = list(answers)
        self.likes = sum(a.label == "like" for a in self.answers)
        self.dislikes = len(self.answers) - self.likes
        self.by_id = {a.completion_id: a for a in self.answers}
        self._exact: dict[str, Counter[str]] = {}
        for answer in self.answers:
            self._exact.setdefault(answer_key(answer.text), Counter())[answer.label] += 1
        self._shingles: list[np.ndarray] | None = None

    def tally(self, text: str) -> Counter[str]:
        """Likes and dislikes of every labelled answer that is this answer (the answer itself included)."""
        if self.similarity >= 1.0:
            return self._exact.get(answer_key(text), Counter())
        if self._shingles is None:
            self._shingles = [shingles(answer_key(a.text)) for a in self.answers]
        own = shingles(answer_key(text))
        counts: Counter[str] = Counter()
        for answer, other in zip(self.answers, self._shingles, strict=True):
            if jaccard(own, other) >= self.similarity:
                counts[answer.label] += 1
        return counts

    def good_share(self, noise_rate: float) -> float:
        """Estimated share of truly good answers, p, from the like rate and the noise rate (module docstring)."""
        rate = (self.likes + 1) / (self.likes + self.dislikes + 2)
        return min(1.0, max(0.0, (rate - noise_rate) / (1 - 2 * noise_rate)))

    def trusts(self, label: str, noise_rate: float) -> bool:
        """Whether a label in this group is better explained by the answer than by a flipped vote."""
        if noise_rate <= 0:
            return True
        good = self.good_share(noise_rate)
        return good >= noise_rate if label == "like" else 1 - good >= noise_rate

    def contradicts(self, completion_id: str, label: str) -> bool:
        answer = self.by_id.get(completion_id)
        if answer is None:  # no longer labelled: pair_is_live decides about it
            return False
        counts = self.tally(answer.text)
        other = "dislike" if label == "like" else "like"
        return counts[other] > counts[label]


class _Votes:
    """Likes and votes per identity in a set of votes, to read the others' like rate of each voter. Each other
    voter counts once, by their own like share: one heavy voter is one voter."""

    __slots__ = ("_shares", "likes", "total")

    def __init__(self) -> None:
        self.likes: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self._shares: float | None = None

    def add(self, identity: str, rating: str) -> None:
        self.total[identity] += 1
        self.likes[identity] += rating == "like"
        self._shares = None

    def others(self, identity: str) -> tuple[float, int]:
        """(likes, voters) of everyone else here, each voter counting as their share of likes."""
        if self._shares is None:
            self._shares = sum(self.likes[who] / n for who, n in self.total.items())
        own = self.total[identity]
        if not own:
            return self._shares, len(self.total)
        return self._shares - self.likes[identity] / own, len(self.total) - 1

    def like_rate(self, identity: str) -> float:
        """The other voters' mean share of likes, with one more voter who likes everything and one who likes
        nothing: never 0 or 1 (a crowd that disliked every answer so far leaves a like possible), one half for none."""
        likes, voters = self.others(identity)
        return (likes + 1) / (voters + 2)


@dataclass(frozen=True, slots=True)
class VoterEvidence:
    votes: int  # informative votes: those with others to compare with
    log_odds: float  # log P(votes | voting opposite to the others) - log P(votes | with them)


def vote_log_odds(rating: str, other_likes: float, others: int, prior_votes: float = 1.0, center: float = 0.5) -> float:
    """log P(this vote | the voter votes opposite to the others) - log P(this vote | with them), the others' like
    rate smoothed by 2 * prior_votes (> 0) votes at the rate ``center``, at most MAX_VOTE_LOG_ODDS either way."""
    like_rate = (other_likes + 2 * prior_votes * center) / (others + 2 * prior_votes)
    evidence = max(-MAX_VOTE_LOG_ODDS, min(MAX_VOTE_LOG_ODDS, math.log((1 - like_rate) / like_rate)))
    return evidence if rating == "like" else -evidence


def voter_evidence(group_votes: Iterable[Sequence[Vote]], center_on_crowd: bool = True) -> dict[str, VoterEvidence]:
    """identity -> VoterEvidence, from each prompt group's votes as (identity, rating, answer text[, served model]).
    A vote is compared with the other voters' votes on the same answer when there are any, else with the other
    votes on the prompt (at least two), smoothed towards the crowd's like rate of the same served model's answers
    (center_on_crowd=False: towards one half, the rule before 2026-12-08, kept to measure one against the other)."""
    groups = [list(votes) for votes in group_votes]
    crowd: defaultdict[str, _Votes] = defaultdict(_Votes)
    for votes in groups:
        for vote in votes:
            crowd[served(vote)].add(vote[0], vote[1])
    log_odds: defaultdict[str, float] = defaultdict(float)
    informative: Counter[str] = Counter()
    for votes in groups:
        group = _Votes()
        by_answer: defaultdict[str, _Votes] = defaultdict(_Votes)
        for vote in votes:
            group.add(vote[0], vote[1])
            by_answer[answer_key(vote[2])].add(vote[0], vote[1])
        for vote in votes:
            identity, rating, text = vote[0], vote[1], vote[2]
            other_likes, others = by_answer[answer_key(text)].others(identity)
            if others:
                evidence = vote_log_odds(rating, other_likes, others, ANSWER_PRIOR_VOTES)
            else:
                other_likes, others = group.others(identity)
                if others < 2:
                    continue
                center = crowd[served(vote)].like_rate(identity) if center_on_crowd else 0.5
                evidence = vote_log_odds(rating, other_likes, others, PROMPT_PRIOR_VOTES, center)
            if abs(evidence) > 1e-9:  # the others are split evenly (up to rounding of their like shares)
                informative[identity] += 1
                log_odds[identity] += evidence
    return {who: VoterEvidence(n, log_odds[who]) for who, n in informative.items()}


def unreliable_voters(evidence: Mapping[str, VoterEvidence], flip_odds: float) -> frozenset[str]:
    """The identities with at least MIN_JUDGED_VOTES informative votes that are at least flip_odds times
    likelier from a voter voting opposite to the others than from one voting with them (0: nobody)."""
    if flip_odds <= 0:
        return frozenset()
    threshold = math.log(flip_odds)
    return frozenset(who for who, e in evidence.items() if e.votes >= MIN_JUDGED_VOTES and e.log_odds >= threshold)


def peel_unreliable_voters(
    group_votes: Iterable[Sequence[Vote]], flip_odds: float, max_rounds: int = 10, center_on_crowd: bool = True
) -> frozenset[str]:
    """unreliable_voters, judged again without the votes of those already found, until no one new is found.

    Adversaries agree with each other: where one likes what the honest users dislike, another's like beside it
    makes both look like the crowd. Once the clearest is found, their votes no longer count among the others
    and the rest stand against the honest votes alone (in a SmolLM2 demo's votes, 4 adversaries of 40 users,
    one round found 1 of them, the second round a second)."""
    groups = [list(votes) for votes in group_votes]
    found: frozenset[str] = frozenset()
    for _ in range(max_rounds):
        remaining = [[vote for vote in votes if vote[0] not in found] for votes in groups] if found else groups
        more = unreliable_voters(voter_evidence(remaining, center_on_crowd), flip_odds) - found
        if not more:
            break
        found |= more
    return found


def without_voters(
    labels: Mapping[str, str], votes: Mapping[str, Sequence[tuple[str, str]]], voters: frozenset[str]
) -> dict[str, str]:
    """A prompt group's labels (completion id -> label) with these voters' votes taken out: a completion they
    voted on is labelled by the majority of its other votes (``votes``: completion id -> (identity, rating)), and
    left out when none is left or those are split evenly."""
    if not voters:
        return dict(labels)
    out: dict[str, str] = {}
    for cid, label in labels.items():
        cast = votes.get(cid, ())
        if all(who not in voters for who, _ in cast):
            out[cid] = label
            continue
        tally = Counter(rating for who, rating in cast if who not in voters)
        if tally["like"] != tally["dislike"]:
            out[cid] = "like" if tally["like"] > tally["dislike"] else "dislike"
    return out


def apply_consensus(
    pairs: Sequence[PairRecord],
    groups: Mapping[str, PromptGroupAnswers],
    noise_rate: float = 0.0,
    unreliable: frozenset[str] = frozenset(),
) -> FilterResult:
    """Drop the pairs a voter in ``unreliable`` contributed to, the pairs with a side that its prompt group's
    votes on the same answer contradict, and (noise_rate > 0) those whose label the group's votes as a whole
    do not support."""
    kept: list[PairRecord] = []
    dropped: Counter[tuple[str, str]] = Counter()
    dropped_ids: dict[str, tuple[str, str]] = {}
    for pair in pairs:
        if unreliable and not unreliable.isdisjoint(pair.get("users") or ()):
            reason: str | None = "unreliable_voter"
        else:
            reason = _drop_reason(pair, groups.get(pair["prompt_hash"]), noise_rate)
        if reason:
            dropped[(FILTER, reason)] += 1
            dropped_ids[pair["pair_id"]] = (FILTER, reason)
        else:
            kept.append(pair)
    return FilterResult(kept, dropped, dropped_ids)


def _drop_reason(pair: PairRecord, group: PromptGroupAnswers | None, noise_rate: float) -> str | None:
    labels = SIDES.get(pair["strategy"])
    if not labels or group is None:
        return None
    sides = list(zip(pair["completion_ids"], labels, strict=False))
    if any(group.contradicts(cid, label) for cid, label in sides):
        return "contradicted"
    if any(not group.trusts(label, noise_rate) for _, label in sides):
        return "noisy_group"
    return None


def group_answers(
    labels: Mapping[str, str], records: Mapping[str, Mapping[str, Any]], similarity: float
) -> PromptGroupAnswers:
    """One prompt group from its labels (completion id -> label) and the completions' records."""
    answers = [
        RatedAnswer(cid, str(records[cid].get("response") or ""), label)
        for cid, label in labels.items()
        if label in ("like", "dislike") and cid in records
    ]
    return PromptGroupAnswers(answers, similarity)
