"""Every Redis key and channel name feedloop uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "feedloop"

    @property
    def redis_epoch(self) -> str:
        """A random id written once into an empty Redis: when it changes, Redis lost its data (RedisWatch)."""
        return f"{self.prefix}:epoch"

    # interactions (written by the API, read by feedback and pairing)
    def interaction(self, completion_id: str) -> str:
        return f"{self.prefix}:interaction:{completion_id}"

    # feedback
    @property
    def feedback_stream(self) -> str:
        return f"{self.prefix}:feedback"

    @property
    def feedback_dead_letter(self) -> str:
        return f"{self.prefix}:feedback:dead"

    def votes(self, completion_id: str) -> str:
        """Hash: voter -> current vote (JSON)."""
        return f"{self.prefix}:votes:{completion_id}"

    def vote_history(self, completion_id: str) -> str:
        """List of every vote and withdrawal on one completion, oldest first."""
        return f"{self.prefix}:votes:{completion_id}:history"

    def rate_limit(self, kind: str, identity: str) -> str:
        return f"{self.prefix}:ratelimit:{kind}:{identity}"

    # API keys (services/core/apikeys.py): only the sha256 of a key is stored
    def api_key(self, digest: str) -> str:
        """Hash: id, app, role, created_at, chat_rate, vote_rate of the key whose sha256 is digest."""
        return f"{self.prefix}:apikey:{digest}"

    @property
    def api_keys(self) -> str:
        """Hash: key id -> sha256 digest (for listing and revoking)."""
        return f"{self.prefix}:apikeys"

    # pairs and datasets
    def pair(self, pair_id: str) -> str:
        return f"{self.prefix}:pair:{pair_id}"

    @property
    def pairs_index(self) -> str:
        """Sorted set of pair ids scored by creation sequence."""
        return f"{self.prefix}:pairs"

    def prompt_group(self, prompt_hash: str) -> str:
        """Hash: completion id -> rating summary of every rated response to one normalized prompt."""
        return f"{self.prefix}:prompt:{prompt_hash}"

    def prompt_liked(self, prompt_hash: str) -> str:
        """Sorted set: completion ids of one normalized prompt whose majority vote is like (score: vote time)."""
        return f"{self.prefix}:prompt:{prompt_hash}:liked"

    def prompt_disliked(self, prompt_hash: str) -> str:
        """Sorted set: completion ids of one normalized prompt whose majority vote is dislike."""
        return f"{self.prefix}:prompt:{prompt_hash}:disliked"

    def pairing_votes(self, completion_id: str) -> str:
        """Hash kept by the pairing worker: identity -> latest vote (JSON [created_at, feedback_id, rating, ...])."""
        return f"{self.prefix}:pairing:votes:{completion_id}"

    def pairing_completion(self, completion_id: str) -> str:
        """JSON of a rated completion as the pairing worker saw it (prompt, response, adapter, prompt hash)."""
        return f"{self.prefix}:pairing:completion:{completion_id}"

    @property
    def labeled_completions(self) -> str:
        """Sorted set of every completion that has had a majority label (the KTO export reads it)."""
        return f"{self.prefix}:pairing:labeled"

    def pairing_candidates(self, strategy: str) -> str:
        """Sorted set of completion ids waiting for a generated counterpart (weaker_answer, stronger_answer)."""
        return f"{self.prefix}:pairing:candidates:{strategy}"

    def pairing_generation_lock(self, strategy: str) -> str:
        """Held while one generation round of a strategy runs, so that overlapping rounds skip."""
        return f"{self.prefix}:pairing:generating:{strategy}"

    @property
    def pairing_attempts(self) -> str:
        """Hash: strategy:completion id -> failed generation attempts."""
        return f"{self.prefix}:pairing:attempts"

    def pair_dropped(self, pair_id: str) -> str:
        """Marker of a pair a filter dropped at creation (value: the reason); keeps drop counts idempotent."""
        return f"{self.prefix}:pairs:dropped:{pair_id}"

    @property
    def pairs_seq(self) -> str:
        """Counter giving every stored pair its creation sequence (its score in pairs_index)."""
        return f"{self.prefix}:pairs:seq"

    @property
    def pairs_stats(self) -> str:
        return f"{self.prefix}:pairs:stats"

    @property
    def datasets_seq(self) -> str:
        return f"{self.prefix}:datasets:seq"

    @property
    def snapshot_lock(self) -> str:
        return f"{self.prefix}:datasets:lock"

    def dataset(self, version: str) -> str:
        return f"{self.prefix}:dataset:{version}"

    @property
    def datasets_index(self) -> str:
        return f"{self.prefix}:datasets"

    # training runs
    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    @property
    def runs_index(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def training_lease(self) -> str:
        return f"{self.prefix}:train:lease"

    @property
    def fencing_counter(self) -> str:
        return f"{self.prefix}:train:fence"

    def trigger_window(self, window: int) -> str:
        return f"{self.prefix}:train:trigger:{window}"

    @property
    def runs_seq(self) -> str:
        """Counter numbering training runs (run-1, run-2, ...)."""
        return f"{self.prefix}:runs:seq"

    def run_history(self, run_id: str) -> str:
        """List of a run's per-step training metrics (JSON), oldest first."""
        return f"{self.prefix}:run:{run_id}:history"

    @property
    def current_run(self) -> str:
        """The one run slot: the id of the run queued or running now (absent: none)."""
        return f"{self.prefix}:train:current"

    @property
    def training_state(self) -> str:
        """Hash: last_run_id, last_run_at, last_dataset_version, first_check_at (what the trigger compares)."""
        return f"{self.prefix}:train:state"

    # adapter registry
    def adapter(self, version: str) -> str:
        return f"{self.prefix}:adapter:{version}"

    @property
    def adapters_index(self) -> str:
        return f"{self.prefix}:adapters"

    @property
    def active_adapter(self) -> str:
        return f"{self.prefix}:adapters:active"

    @property
    def promotions_channel(self) -> str:
        return f"{self.prefix}:promoted"

    @property
    def adapters_seq(self) -> str:
        """Counter numbering adapter versions (feedloop-v1, feedloop-v2, ...)."""
        return f"{self.prefix}:adapters:seq"

    @property
    def previous_adapter(self) -> str:
        """The version active before the current one (kept loaded for an instant rollback)."""
        return f"{self.prefix}:adapters:previous"

    @property
    def adapter_pin(self) -> str:
        """The version an operator pinned; while it exists, auto-promotion is off."""
        return f"{self.prefix}:adapters:pin"

    @property
    def canary_adapter(self) -> str:
        """The version serving a share of users as a canary (at most one at a time)."""
        return f"{self.prefix}:adapters:canary"

    def canary_health(self, version: str) -> str:
        """Hash of a canary's hard-failure counters (requests, errors, degenerate answers, failed replicas)."""
        return f"{self.prefix}:canary-health:{version}"

    def canary_votes(self, version: str) -> str:
        """Hash of the votes cast during a canary: (user, completion) -> the rated version, rating and time."""
        return f"{self.prefix}:canary-votes:{version}"
