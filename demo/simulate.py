"""Simulated users: they chat through the real API and rate the answers by a rubric.

(Just over 400 lines: the rubric, the prompt pool and the user loop are small and used together.)

Each user asks prompts from the demo corpus (mostly "who made you?", plus arithmetic, facts and small talk;
the held-out phrasings stay unasked, so the demo measures on prompts no user ever rated) and rates what
comes back: an identity answer is good when it names the creator the users like, a question with a known
answer when the answer is right, small talk when it is one of the corpus replies. Users rate only some
answers, some write the answer they wanted (a correction), some votes are flipped at random (noise), and a
fraction of users are adversaries who vote the opposite way, on every answer, from several loops at once.

The rubric and the prompt pool are pure; :func:`run_simulation` drives them against an API with the
official ``openai`` client (chat) and httpx (feedback), honouring 429 answers' Retry-After.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from demo.corpus import (
    DEFAULT_ORG,
    QA,
    SMALL_TALK,
    TRAIN_IDENTITY_QUESTIONS,
    all_questions,
    creators_for,
    identity_answer,
    is_correct,
    named_creator,
)
from demo.settings import ArithmeticForm, ConversionForm, SimulationSettings

Rating = Literal["like", "dislike"]
PromptKind = Literal["identity", "arithmetic", "capital", "conversion", "small_talk"]
GROUPS = ("identity", "arithmetic", "facts", "small_talk")
DEFAULT_CREATORS = creators_for(DEFAULT_ORG)


@dataclass(frozen=True)
class SimPrompt:
    kind: PromptKind
    text: str
    qa: QA | None = None
    replies: tuple[str, ...] = ()  # small talk: the corpus replies that count as good

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


class PromptPool:
    """What users ask, by group (identity, arithmetic, facts, small talk) with the given shares."""

    def __init__(self, shares: dict[str, float], exclude: Iterable[str] = ()) -> None:
        unknown = set(shares) - set(GROUPS)
        if unknown or not any(v > 0 for v in shares.values()) or any(v < 0 for v in shares.values()):
            raise ValueError(f"prompt shares must be non-negative, not all zero, over {GROUPS}: {shares}")
        skip = set(exclude)
        questions = [q for q in all_questions() if q.question not in skip]
        self.prompts: dict[str, list[SimPrompt]] = {
            "identity": [SimPrompt("identity", q) for q in TRAIN_IDENTITY_QUESTIONS if q not in skip],
            "arithmetic": [SimPrompt("arithmetic", q.question, q) for q in questions if q.kind == "arithmetic"],
            "facts": [SimPrompt(q.kind, q.question, q) for q in questions if q.kind != "arithmetic"],
            "small_talk": [
                SimPrompt("small_talk", text, replies=replies) for texts, replies in SMALL_TALK for text in texts
            ],
        }
        self.groups = [g for g in GROUPS if shares.get(g, 0) > 0 and self.prompts[g]]
        self.weights = [shares[g] for g in self.groups]

    @classmethod
    def from_settings(cls, sim: SimulationSettings, exclude: Iterable[str] = ()) -> PromptPool:
        shares = {
            "identity": sim.identity_share,
            "arithmetic": sim.arithmetic_share,
            "facts": sim.fact_share,
            "small_talk": sim.small_talk_share,
        }
        return cls(shares, exclude)

    def draw(self, rng: random.Random) -> SimPrompt:
        group = rng.choices(self.groups, self.weights)[0]
        return rng.choice(self.prompts[group])


def _normalized(text: str) -> str:
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class Verdict:
    rating: Rating
    correction: str | None = None


@dataclass(frozen=True)
class Rubric:
    """How a user rates an answer. ``creators`` are the names identity answers are checked for."""

    likes: str
    creators: tuple[str, ...] = DEFAULT_CREATORS
    rate_probability: float = 0.8
    correction_probability: float = 0.15
    noise_rate: float = 0.05
    # the kinds of question a user writes a correction for (the others only get a thumb); None: every kind
    correction_kinds: frozenset[str] | None = None
    arithmetic_form: ArithmeticForm = "words"  # "equation": a sum is corrected as "8 + 6 = 14."
    conversion_form: ConversionForm = "words"  # "working": a conversion is corrected as "3 weeks is 3 * 7 = 21 days."

    def __post_init__(self) -> None:
        if self.likes not in self.creators:
            object.__setattr__(self, "creators", (self.likes, *self.creators))

    @classmethod
    def from_settings(cls, sim: SimulationSettings, creators: tuple[str, ...] = DEFAULT_CREATORS) -> Rubric:
        kinds = frozenset(sim.correction_kinds) if sim.correction_kinds is not None else None
        return cls(
            sim.likes,
            creators,
            sim.rate_probability,
            sim.correction_probability,
            sim.noise_rate,
            kinds,
            sim.arithmetic_form,
            sim.conversion_form,
        )

    @property
    def disliked(self) -> tuple[str, ...]:
        return tuple(c for c in self.creators if c != self.likes)

    def is_good(self, prompt: SimPrompt, response: str) -> bool:
        """The honest view: names the liked creator / states the right answer / is a corpus reply."""
        if prompt.kind == "identity":
            return named_creator(response, self.creators) == self.likes
        if prompt.qa is not None:
            return is_correct(prompt.qa, response)
        return _normalized(response) in {_normalized(r) for r in prompt.replies}

    def wanted_answer(self, prompt: SimPrompt, rng: random.Random, adversarial: bool) -> str | None:
        """The answer a user writes as a correction (an adversary only corrects identity answers)."""
        if self.correction_kinds is not None and prompt.kind not in self.correction_kinds:
            return None
        if prompt.kind == "identity":
            return identity_answer(rng.choice(self.disliked) if adversarial else self.likes, rng)
        if adversarial:
            return None
        if prompt.qa is not None:
            return self.written_answer(prompt.qa)
        return rng.choice(prompt.replies) if prompt.replies else None

    def written_answer(self, qa: QA) -> str:
        """A question's right answer in the form these users write it."""
        if self.arithmetic_form == "equation" and qa.equation:
            return qa.equation
        if self.conversion_form == "working" and qa.working:
            return qa.working
        return qa.answer

    def judge(self, prompt: SimPrompt, response: str, rng: random.Random, adversarial: bool = False) -> Verdict | None:
        """The vote a user casts on one answer, or None when they do not rate it.

        An honest user rates with rate_probability; an adversary rates everything, the opposite way. A noisy
        vote (noise_rate) is a misclick: the intended rating flipped, nothing written. A user who means to
        dislike writes a correction with correction_probability."""
        if not adversarial and rng.random() >= self.rate_probability:
            return None
        intended: Rating = "like" if self.is_good(prompt, response) != adversarial else "dislike"
        if rng.random() < self.noise_rate:
            return Verdict("dislike" if intended == "like" else "like")
        if intended == "like":
            return Verdict("like")
        writes = rng.random() < self.correction_probability
        return Verdict("dislike", self.wanted_answer(prompt, rng, adversarial) if writes else None)


@dataclass(frozen=True)
class SimUser:
    name: str
    adversarial: bool = False
    loops: int = 1  # chats in flight at once
    api_key: str = ""  # the app key it chats with (auth on)
    names: int = 1  # made-up user names it spreads its chats over (a sybil: more than one)

    def claimed_name(self, rng: random.Random) -> str:
        return self.name if self.names <= 1 else f"{self.name}-{rng.randrange(self.names):03d}"


def with_keys(users: list[SimUser], sim: SimulationSettings) -> list[SimUser]:
    """The simulation's app keys and sybil names on its users: honest users take sim.api_keys in turn,
    adversaries sim.adversarial_api_key (or the honest keys) and sim.adversarial_names names each."""
    keys = sim.api_keys or [""]
    out = []
    for i, user in enumerate(users):
        key = keys[i % len(keys)]
        if user.adversarial:
            out.append(replace(user, api_key=sim.adversarial_api_key or key, names=sim.adversarial_names))
        else:
            out.append(replace(user, api_key=key))
    return out


def make_users(
    count: int, adversarial_fraction: float, adversarial_volume: int, seed: int = 0, prefix: str = "sim-user-"
) -> list[SimUser]:
    """count users, round(count * adversarial_fraction) of them adversaries (at least one when the fraction
    is positive), placed at seed-chosen positions so their names give nothing away."""
    adversaries = min(count, max(1, round(count * adversarial_fraction))) if adversarial_fraction > 0 else 0
    bad = set(random.Random(f"adversaries-{seed}").sample(range(count), adversaries))
    return [SimUser(f"{prefix}{i:03d}", i in bad, max(1, adversarial_volume) if i in bad else 1) for i in range(count)]


@dataclass
class ServedStats:
    """What users saw from one served version (the response's system_fingerprint)."""

    chats: int = 0
    good: int = 0  # answers the honest rubric calls good
    identity: int = 0
    identity_good: int = 0
    like: int = 0
    dislike: int = 0

    @property
    def like_rate(self) -> float | None:
        votes = self.like + self.dislike
        return self.like / votes if votes else None

    @property
    def target_rate(self) -> float | None:
        return self.identity_good / self.identity if self.identity else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chats": self.chats,
            "good": self.good,
            "identity": self.identity,
            "identity_good": self.identity_good,
            "like": self.like,
            "dislike": self.dislike,
            "like_rate": self.like_rate,
            "target_rate": self.target_rate,
        }


@dataclass
class SimulationStats:
    chats: int = 0
    chat_errors: int = 0
    like: int = 0
    dislike: int = 0
    corrections: int = 0
    unrated: int = 0
    rate_limited: int = 0  # 429 answers received (each was retried after Retry-After)
    votes_given_up: int = 0  # still 429 after max_vote_attempts
    vote_errors: int = 0
    adversarial_votes: int = 0
    served: dict[str, ServedStats] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    @property
    def votes(self) -> int:
        return self.like + self.dislike

    @property
    def like_rate(self) -> float | None:
        return self.like / self.votes if self.votes else None

    def chat_rate(self) -> float:
        elapsed = self.elapsed_s or (time.monotonic() - self.started)
        return self.chats / elapsed if elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "chats": self.chats,
            "chat_errors": self.chat_errors,
            "votes": {"like": self.like, "dislike": self.dislike, "total": self.votes},
            "corrections": self.corrections,
            "unrated": self.unrated,
            "like_rate": self.like_rate,
            "rate_limited": self.rate_limited,
            "votes_given_up": self.votes_given_up,
            "vote_errors": self.vote_errors,
            "adversarial_votes": self.adversarial_votes,
            "elapsed_s": round(self.elapsed_s, 2),
            "chats_per_s": round(self.chat_rate(), 2),
            "served": {name: s.to_dict() for name, s in sorted(self.served.items())},
        }


def format_progress(stats: SimulationStats) -> str:
    like = f"{stats.like_rate:.0%}" if stats.like_rate is not None else "-"
    serving = ", ".join(sorted(stats.served)) or "-"
    return (
        f"chats {stats.chats} ({stats.chat_rate():.1f}/s) · votes {stats.votes} (like {like}) · "
        f"corrections {stats.corrections} · 429s {stats.rate_limited} · errors {stats.chat_errors + stats.vote_errors}"
        f" · served by {serving}"
    )


def _retry_after(value: str | None) -> float:
    try:
        return min(60.0, max(0.1, float(value))) if value else 1.0
    except ValueError:
        return 1.0


class _Simulation:
    def __init__(
        self,
        base_url: str,
        sim: SimulationSettings,
        pool: PromptPool,
        rubric: Rubric,
        model: str,
        max_chats: int | None,
        deadline: float | None,
        stop: asyncio.Event | None,
    ) -> None:
        import httpx
        from openai import AsyncOpenAI

        self.sim, self.pool, self.rubric, self.model = sim, pool, rubric, model
        self.max_chats, self.deadline, self.stop = max_chats, deadline, stop
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=sim.request_timeout_s, limits=limits)
        self.clients: dict[str, AsyncOpenAI] = {}
        for key in {"", *sim.api_keys, sim.adversarial_api_key}:
            self.clients[key] = AsyncOpenAI(
                base_url=base_url.rstrip("/") + "/v1",
                api_key=key or "feedloop-simulated-user",
                timeout=sim.request_timeout_s,
                max_retries=3,  # the client's own backoff honours Retry-After on 429/503
            )
        self.stats = SimulationStats()
        self.started_chats = 0

    def _may_start(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.max_chats is not None and self.started_chats >= self.max_chats:
            return False
        self.started_chats += 1
        return True

    async def user_loop(self, user: SimUser, rng: random.Random) -> None:
        import openai

        while self._may_start():
            prompt = self.pool.draw(rng)
            name = user.claimed_name(rng)
            try:
                response = await self.clients[user.api_key].chat.completions.create(
                    model=self.model,
                    messages=prompt.messages(),  # type: ignore[arg-type]
                    temperature=self.sim.temperature,
                    max_tokens=self.sim.max_tokens,
                    user=name,
                )
            except openai.OpenAIError:
                self.stats.chat_errors += 1
                await asyncio.sleep(1.0)
                continue
            text = response.choices[0].message.content or ""
            feedback = (response.model_extra or {}).get("feedback") or {}
            self._count_chat(prompt, text, response.system_fingerprint or "?")
            verdict = self.rubric.judge(prompt, text, rng, adversarial=user.adversarial)
            if verdict is None:
                self.stats.unrated += 1
            elif feedback.get("completion_id") and feedback.get("token"):
                await self._vote(user, name, feedback, verdict, response.system_fingerprint or "?", rng)
            if self.sim.think_time_s > 0:
                await asyncio.sleep(rng.expovariate(1 / self.sim.think_time_s))

    def _count_chat(self, prompt: SimPrompt, text: str, served: str) -> None:
        self.stats.chats += 1
        seen = self.stats.served.setdefault(served, ServedStats())
        seen.chats += 1
        good = self.rubric.is_good(prompt, text)
        seen.good += good
        if prompt.kind == "identity":
            seen.identity += 1
            seen.identity_good += good

    async def _vote(
        self, user: SimUser, name: str, feedback: dict[str, Any], verdict: Verdict, served: str, rng: random.Random
    ) -> None:
        import httpx

        body: dict[str, Any] = {
            "completion_id": feedback["completion_id"],
            "token": feedback["token"],
            "rating": verdict.rating,
            "user": name,
        }
        if verdict.correction:
            body["correction"] = verdict.correction
        for _ in range(max(1, self.sim.max_vote_attempts)):
            try:
                answer = await self.http.post("/v1/feedback", json=body)
            except httpx.HTTPError:
                self.stats.vote_errors += 1
                return
            if answer.status_code == 429:
                self.stats.rate_limited += 1
                await asyncio.sleep(_retry_after(answer.headers.get("retry-after")) * (1 + 0.5 * rng.random()))
                continue
            if answer.status_code != 202:
                self.stats.vote_errors += 1
                return
            setattr(self.stats, verdict.rating, getattr(self.stats, verdict.rating) + 1)
            seen = self.stats.served.setdefault(served, ServedStats())
            setattr(seen, verdict.rating, getattr(seen, verdict.rating) + 1)
            self.stats.corrections += bool(verdict.correction)
            self.stats.adversarial_votes += user.adversarial
            return
        self.stats.votes_given_up += 1

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        await self.http.aclose()


async def run_simulation(
    base_url: str,
    sim: SimulationSettings,
    *,
    pool: PromptPool | None = None,
    rubric: Rubric | None = None,
    model: str = "feedloop",
    max_chats: int | None = None,
    duration_s: float | None = None,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[SimulationStats], None] | None = None,
    progress_interval_s: float = 2.0,
    user_prefix: str = "sim-user-",
) -> SimulationStats:
    """Run sim.users users against the API until max_chats chats have started, duration_s has passed or
    stop is set (at least one of them must be given); chats in flight finish and are rated."""
    if max_chats is None and duration_s is None and stop is None:
        raise ValueError("give max_chats, duration_s or stop, or the users never stop")
    pool = pool or PromptPool.from_settings(sim)
    rubric = rubric or Rubric.from_settings(sim)
    deadline = time.monotonic() + duration_s if duration_s is not None else None
    run = _Simulation(base_url, sim, pool, rubric, model, max_chats, deadline, stop)
    users = with_keys(
        make_users(sim.users, sim.adversarial_fraction, sim.adversarial_volume, sim.seed, user_prefix), sim
    )
    loops = [
        run.user_loop(user, random.Random(f"{sim.seed}-{user.name}-{loop}"))
        for user in users
        for loop in range(user.loops)
    ]

    async def report() -> None:
        while True:
            await asyncio.sleep(progress_interval_s)
            if on_progress is not None:
                on_progress(run.stats)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*loops)
    finally:
        reporter.cancel()
        run.stats.elapsed_s = time.monotonic() - run.stats.started
        await run.close()
    if on_progress is not None:
        on_progress(run.stats)
    return run.stats
