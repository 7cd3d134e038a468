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

Voters who disagree with the crowd (``min_agreement`` > 0). Each vote is compared with the other voters'
votes on the same answer to the same prompt when there are at least two, else with the other votes in its
prompt group: it agrees when it goes the way most of them voted (their like rate above or below one half; a
tie, or fewer than two other votes, says nothing). A voter's agreement is
(agreements + 1) / (informative votes + 2) over every group in the snapshot, judged from MIN_JUDGED_VOTES
informative votes on. An honest user disagrees where
an answer is better or worse than most answers to its prompt (a minority of their votes, even while a
behaviour is changing); a user voting against the crowd on purpose, or at random, disagrees on most. Every
pair a voter below ``min_agreement`` contributed to (a vote on either side, or a correction) is dropped
(``consensus:unreliable_voter``), corrections included: an adversary's correction names what they want. The
price: a real minority taste that the rest of the users vote against is left out of training too.
"""

from __future__ import annotations

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

# strategy -> the label each of its completion ids carries (completion_ids order)
SIDES: dict[str, tuple[str, ...]] = {
    "same_prompt": ("like", "dislike"),
    "weaker_answer": ("like",),
    "stronger_answer": ("dislike",),
}


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
    """Likes and votes per identity in a set of votes, to read the others' like rate of each voter."""

    __slots__ = ("likes", "total")

    def __init__(self) -> None:
        self.likes: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def add(self, identity: str, rating: str) -> None:
        self.total[identity] += 1
        self.likes[identity] += rating == "like"

    def others_like_rate(self, identity: str) -> float | None:
        """The like rate of everyone else's votes here (None: fewer than two)."""
        others = self.total.total() - self.total[identity]
        return (self.likes.total() - self.likes[identity]) / others if others >= 2 else None


def voter_agreement(group_votes: Iterable[Sequence[tuple[str, str, str]]]) -> dict[str, tuple[int, int]]:
    """identity -> (agreements, informative votes), from each prompt group's votes as (identity, rating,
    answer text). A vote is compared with the other voters' votes on the same answer when there are at least
    two, else with the other votes on the prompt."""
    agree: Counter[str] = Counter()
    informative: Counter[str] = Counter()
    for votes in group_votes:
        group = _Votes()
        by_answer: defaultdict[str, _Votes] = defaultdict(_Votes)
        for identity, rating, text in votes:
            group.add(identity, rating)
            by_answer[answer_key(text)].add(identity, rating)
        for identity, rating, text in votes:
            others_like = by_answer[answer_key(text)].others_like_rate(identity)
            if others_like is None:
                others_like = group.others_like_rate(identity)
            if others_like is None or others_like == 0.5:
                continue
            informative[identity] += 1
            agree[identity] += (rating == "like") == (others_like > 0.5)
    return {identity: (agree[identity], n) for identity, n in informative.items()}


def unreliable_voters(agreement: Mapping[str, tuple[int, int]], min_agreement: float) -> frozenset[str]:
    """The identities with at least MIN_JUDGED_VOTES informative votes whose smoothed agreement
    (agreements + 1) / (informative votes + 2) is below min_agreement."""
    if min_agreement <= 0:
        return frozenset()
    return frozenset(
        who
        for who, (agreed, n) in agreement.items()
        if n >= MIN_JUDGED_VOTES and (agreed + 1) / (n + 2) < min_agreement
    )


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
