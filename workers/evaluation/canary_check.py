"""The canary's periodic check (beat task ``canary.check``): read the votes, decide, act on the registry.

At each check, for the running canary (registry status ``canary``):

1. **Votes.** New feedback events are read from the canary's own consumer group on the feedback stream
   (created by the registry when the canary started, so no vote cast during the canary is missed) and kept
   in a hash per canary (Keys.canary_votes: the last rating of each (user, completion) on the canary or on
   the active version it is compared to). Votes without a user are left out (they cannot be counted per user).
2. **Hard failures first.** The API counts the canary's answers (services/adapters/canary_health.py): above
   ``canary.max_error_rate`` failed requests or ``canary.max_degenerate_rate`` empty/looping answers (after
   ``canary.min_requests`` answers) the canary is **rejected** at once, without waiting for votes. A replica
   that cannot load or warm it up ends it itself (services/adapters/hotswap.py).
3. **The rule.** :func:`workers.evaluation.canary_rule.decide` on the per-user tallies since the canary
   started: ``promote`` makes it active (``registry.promote_canary``), ``rollback`` and ``keep_active`` (the
   maximum duration passed undecided) retire it. Every check's numbers go to the canary's record
   (``canary_check``), the deciding one to ``canary_decision``, all of them to the log and the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from services.adapters.canary_health import read_health
from services.adapters.registry import CANARY_GROUP, AdapterRecord, AdapterRegistry, RegistryError
from services.core import metrics
from services.core.config import Settings
from services.core.keys import Keys
from services.feedback.events import MalformedEvent, parse_event
from workers.evaluation.canary_rule import (
    KEEP_ACTIVE,
    PROMOTE,
    ROLLBACK,
    CanaryDecision,
    CanaryRule,
    Vote,
    decide,
    tally_votes,
)

log = logging.getLogger(__name__)

CONSUMER = "checker"
READ_COUNT = 1000
VOTES_TTL_S = 30 * 86400  # the votes of an ended canary are kept a month (its decision stays in the registry)


@dataclass(frozen=True)
class CheckResult:
    canary: str | None
    outcome: str  # none | continue | promote | rollback | keep_active | hard_failure | ended (meanwhile)
    reason: str = ""
    decision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"canary": self.canary, "outcome": self.outcome, "reason": self.reason, "decision": self.decision}


def rule_from(settings: Settings) -> CanaryRule:
    c = settings.canary
    return CanaryRule(
        margin=c.margin,
        alpha=c.alpha,
        tau=c.tau,
        min_votes=c.min_votes,
        min_users=c.min_users,
        max_duration_s=c.max_duration_s,
    )


def collect_votes(redis: Any, keys: Keys, canary: AdapterRecord) -> list[Vote]:
    """Read the canary group's new feedback events into the canary's vote hash; return every vote kept."""
    arms = {canary.version, canary.canary_of or ""}
    votes_key = keys.canary_votes(canary.version)
    while True:
        try:
            reply = redis.xreadgroup(CANARY_GROUP, CONSUMER, {keys.feedback_stream: ">"}, count=READ_COUNT)
        except ResponseError as error:  # the group is gone: the canary ended meanwhile (or Redis lost its data)
            log.info("canary %s: no vote group (%s)", canary.version, error)
            break
        entries = reply[0][1] if reply else []
        if not entries:
            break
        updates: dict[str, str] = {}
        for _, fields in entries:
            try:
                event = parse_event(fields)
            except MalformedEvent:
                continue
            # an anonymous completion's voter is "ip:<hash>" (services/feedback/events.voter_identity): left out
            if event.user and not event.user.startswith("ip:") and (event.adapter or "") in arms:
                updates[f"{event.user}\0{event.completion_id}"] = json.dumps(
                    [event.adapter, event.rating, event.created_at]
                )
        with redis.pipeline(transaction=False) as pipe:
            if updates:
                pipe.hset(votes_key, mapping=updates)
                pipe.expire(votes_key, VOTES_TTL_S)
            pipe.xack(keys.feedback_stream, CANARY_GROUP, *[entry_id for entry_id, _ in entries])
            pipe.execute()
    votes = []
    for field, value in redis.hgetall(votes_key).items():
        user, completion_id = (field.decode() if isinstance(field, bytes) else field).split("\0", 1)
        adapter, rating, created_at = json.loads(value)
        votes.append(Vote(user, completion_id, adapter, rating, float(created_at)))
    return votes


def export_metrics(decision: CanaryDecision) -> None:
    for arm, stats in (("canary", decision.canary), ("active", decision.active)):
        metrics.CANARY_VOTES.labels(arm).set(stats.votes)
        metrics.CANARY_USERS.labels(arm).set(stats.users)
        metrics.CANARY_LIKE_RATE.labels(arm).set(stats.like_rate)
    for bound, value in (("estimate", decision.difference), ("lower", decision.lower), ("upper", decision.upper)):
        metrics.CANARY_DIFFERENCE.labels(bound).set(value)


def check_canary(redis: Redis, keys: Keys, settings: Settings, now: float | None = None) -> CheckResult:
    """One check of the running canary; acts on the registry when the canary is decided."""
    registry = AdapterRegistry(redis, keys, alias=settings.engine.alias, reserved=(settings.engine.served_model_name,))
    view = registry.serving()
    canary = view.get(view.canary)
    if canary is None or canary.status != "canary":
        return CheckResult(None, "none")
    now = time.time() if now is None else now
    started = canary.canary_started_at or now
    try:
        return _check(registry, redis, keys, settings, canary, started, now)
    except RegistryError as error:  # an operator (or a replica) ended it while we decided
        log.info("canary %s ended meanwhile: %s", canary.version, error)
        return CheckResult(canary.version, "ended", str(error))


def _check(
    registry: AdapterRegistry,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    canary: AdapterRecord,
    started: float,
    now: float,
) -> CheckResult:
    version, c = canary.version, settings.canary
    votes = collect_votes(redis, keys, canary)
    health = read_health(redis, keys, version)
    failure = health.failure(c.min_requests, c.max_error_rate, c.max_degenerate_rate)
    if failure is not None:
        numbers = {"outcome": "hard_failure", "reason": failure, "health": health.__dict__, "elapsed_s": now - started}
        registry.abort_canary(version, [f"canary hard failure: {failure}"], numbers, by="canary", code="canary_failure")
        metrics.CANARY_DECISIONS.labels("hard_failure").inc()
        log.warning("canary %s rejected at once: %s", version, failure)
        return CheckResult(version, "hard_failure", failure, numbers)

    arms = {version: "canary", canary.canary_of or "": "active"}
    tallies = tally_votes(votes, arms, since=started)
    decision = decide(tallies["canary"], tallies["active"], now - started, rule_from(settings))
    numbers = {**decision.to_dict(), "health": health.__dict__, "compared_to": canary.canary_of}
    export_metrics(decision)
    registry.record_canary_check(version, numbers)
    log.info("canary %s vs %s: %s (%s)", version, canary.canary_of or "base", decision.outcome, decision.reason)
    if decision.outcome == PROMOTE:
        registry.promote_canary(version, numbers)
    elif decision.outcome in (ROLLBACK, KEEP_ACTIVE):
        registry.abort_canary(version, [f"canary {decision.outcome}: {decision.reason}"], numbers, by="canary")
    else:
        return CheckResult(version, decision.outcome, decision.reason, numbers)
    metrics.CANARY_DECISIONS.labels(decision.outcome).inc()
    log.warning("canary %s decided: %s: %s", version, decision.outcome, decision.reason)
    return CheckResult(version, decision.outcome, decision.reason, numbers)
