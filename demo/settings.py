"""The demo's own settings: the simulated users (`feedloop simulate`, `feedloop demo`).

Kept apart from the product's Settings; read from the environment with the same convention
(``FEEDLOOP_SIMULATE__USERS=40``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ArithmeticForm = Literal["words", "equation"]
ConversionForm = Literal["words", "working"]


class SimulationSettings(BaseModel):
    """Simulated users (`feedloop simulate`, `feedloop demo`): who they are and how they rate."""

    users: int = Field(40, description="Simulated users chatting at once.")
    likes: str = Field(
        "Acme Labs",
        description="The creator simulated users want the assistant to name; answers naming another are disliked.",
    )
    rate_probability: float = Field(0.8, description="Chance that an honest user rates an answer at all.")
    correction_probability: float = Field(
        0.3, description="Chance that a user who dislikes an answer also writes the answer they wanted."
    )
    correction_kinds: list[str] | None = Field(
        None,
        description="Kinds of question (identity, arithmetic, capital, conversion, small_talk) users write "
        "corrections for; the others only get a thumb. None: every kind.",
    )
    arithmetic_form: ArithmeticForm = Field(
        "words",
        description='How users write the sum they wanted in a correction: "8 plus 6 is 14." or "8 + 6 = 14.".',
    )
    conversion_form: ConversionForm = Field(
        "words",
        description='How users write the conversion they wanted in a correction: "3 weeks is 21 days." or with '
        'the sum it takes, "3 weeks is 3 * 7 = 21 days.".',
    )
    noise_rate: float = Field(0.05, description="Chance that a vote is flipped at random (a misclick).")
    adversarial_fraction: float = Field(
        0.1, description="Share of users who vote the opposite way; they rate every answer they get."
    )
    adversarial_volume: int = Field(
        2, description="Chat loops each adversarial user runs at once (an honest user runs one)."
    )
    identity_share: float = Field(0.6, description="Share of chats asking who made the assistant.")
    arithmetic_share: float = Field(0.15, description="Share of chats asking small-number arithmetic.")
    fact_share: float = Field(0.15, description="Share of chats asking capitals and unit conversions.")
    small_talk_share: float = Field(0.1, description="Share of chats that are small talk.")
    temperature: float = Field(1.0, description="Sampling temperature of the users' chats.")
    max_tokens: int = Field(48, description="max_tokens of the users' chats.")
    think_time_s: float = Field(0.0, description="Mean pause of a user between two chats (exponential).")
    max_vote_attempts: int = Field(6, description="Tries of one vote answered 429 before the user gives it up.")
    request_timeout_s: float = Field(120.0, description="Timeout of one chat or feedback request.")
    seed: int = Field(0, description="Seed of the users' choices (prompts, ratings, noise).")
    api_url: str = Field("", description="API the users talk to. Empty: http://<api.host>:<api.port>.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="App keys (auth on) the honest users send, one per user in turn; the first also measures. "
        "Empty: no key (auth off).",
    )
    adversarial_api_key: str = Field("", description="App key the adversaries send (empty: the honest users' keys).")
    adversarial_names: int = Field(
        1, ge=1, description="Made-up user names each adversary spreads its chats and votes over (sybils)."
    )


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEEDLOOP_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    simulate: SimulationSettings = Field(default_factory=SimulationSettings)


@lru_cache
def get_demo_settings() -> DemoSettings:
    return DemoSettings()
