"""`feedloop simulate` (simulated users against a running API) and `feedloop demo` (the whole loop, measured).

Mounted in services/cli/main.py with ``app.add_typer(demo_app)`` (no name: the commands sit at the top level).
Heavy imports happen inside the commands, so `feedloop --help` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

demo_app = typer.Typer()

Users = Annotated[int | None, typer.Option(help="Simulated users (default: simulate.users).")]
Likes = Annotated[str | None, typer.Option(help="The creator users like, e.g. 'Acme Labs', 'OpenAI', 'Meta'.")]
RateProbability = Annotated[float | None, typer.Option(help="Chance an honest user rates an answer.")]
CorrectionProbability = Annotated[float | None, typer.Option(help="Chance a dislike comes with a correction.")]
Noise = Annotated[float | None, typer.Option(help="Chance a vote is flipped at random.")]
Adversarial = Annotated[float | None, typer.Option(help="Share of users voting the opposite way.")]
AdversarialVolume = Annotated[int | None, typer.Option(help="Chat loops per adversarial user.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the users' choices.")]


def simulation_settings(profile_defaults: Mapping[str, Any] | None = None, **overrides: Any) -> Any:
    """The simulate settings: a profile's defaults where the environment sets nothing, then the options given on
    the command line (None: keep the setting)."""
    from demo.settings import get_demo_settings

    sim = get_demo_settings().simulate
    defaults = {k: v for k, v in (profile_defaults or {}).items() if k not in sim.model_fields_set}
    return sim.model_copy(update={**defaults, **{k: v for k, v in overrides.items() if v is not None}})


def demo_options(profile: Any, rounds: int | None, final_chats: int | None, method: str | None, **rest: Any) -> Any:
    """`feedloop demo`'s options: the profile's rounds and final chats unless given; `method` (dpo or kto) set for
    the children, else training.method as configured."""
    from demo.run import DemoOptions

    return DemoOptions(
        rounds=profile.rounds if rounds is None else rounds,
        final_chats=profile.final_chats if final_chats is None else final_chats,
        profile=profile,
        env={"FEEDLOOP_TRAINING__METHOD": method} if method else {},
        **rest,
    )


@demo_app.command()
def simulate(
    chats: Annotated[int | None, typer.Option(help="Stop after this many chats (200 without --duration).")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    users: Users = None,
    likes: Likes = None,
    rate_probability: RateProbability = None,
    correction_probability: CorrectionProbability = None,
    noise: Noise = None,
    adversarial: Adversarial = None,
    adversarial_volume: AdversarialVolume = None,
    seed: Seed = None,
    api_url: Annotated[str | None, typer.Option(help="API base URL (default: simulate.api_url, api.port).")] = None,
    model: Annotated[str, typer.Option(help="Model name the users chat with.")] = "feedloop",
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Simulated users chat through the API and rate the answers by a rubric (see `feedloop settings`)."""
    import asyncio

    from demo.measure import DemoModelInfo
    from demo.report import percent
    from demo.simulate import PromptPool, Rubric, format_progress, run_simulation
    from services.core.config import get_settings

    settings = get_settings()
    sim = simulation_settings(
        users=users, likes=likes, rate_probability=rate_probability, correction_probability=correction_probability,
        noise_rate=noise, adversarial_fraction=adversarial, adversarial_volume=adversarial_volume, seed=seed,
        api_url=api_url,
    )  # fmt: skip
    base_url = sim.api_url or f"http://{settings.api.host}:{settings.api.port}"
    info = DemoModelInfo.load(settings.model_path())
    if chats is None and duration is None:
        chats = 200
    typer.echo(
        f"simulate: {sim.users} users ({sim.adversarial_fraction:.0%} adversarial) liking {sim.likes!r} -> {base_url}",
        err=True,
    )

    def show(stats: Any) -> None:
        typer.echo(f"  {format_progress(stats)}", err=True)

    stats = asyncio.run(
        run_simulation(
            base_url, sim, pool=PromptPool.from_settings(sim, exclude=info.held_out_prompts()),
            rubric=Rubric.from_settings(sim, info.creators), model=model, max_chats=chats, duration_s=duration,
            on_progress=show, progress_interval_s=5.0,
        )
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        typer.echo(
            f"chats {stats.chats} in {stats.elapsed_s:.0f} s ({stats.chat_rate():.1f}/s) · votes like {stats.like} / "
            f"dislike {stats.dislike} · corrections {stats.corrections} · like-rate {percent(stats.like_rate)} · "
            f"429s {stats.rate_limited} · errors {stats.chat_errors + stats.vote_errors}"
        )
    if stats.chats == 0:
        raise typer.Exit(code=1)


@demo_app.command()
def demo(
    rounds: Annotated[
        int | None,
        typer.Option(
            help="Training rounds: users until training fires, then measure (default: the model's, 1 "
            "for smollm2, 2 for toy)."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Identity answers sampled per measurement (temperature 0.7).")] = 240,
    questions: Annotated[int, typer.Option(help="Held-out arithmetic/fact questions measured (0: all).")] = 0,
    final_chats: Annotated[
        int | None,
        typer.Option(
            help="Chats on the final version for its like-rate (0: skip; default: the model's, 100 for "
            "smollm2, 200 for toy)."
        ),
    ] = None,
    users: Users = None,
    likes: Likes = None,
    rate_probability: RateProbability = None,
    correction_probability: CorrectionProbability = None,
    noise: Noise = None,
    adversarial: Adversarial = None,
    adversarial_volume: AdversarialVolume = None,
    seed: Seed = None,
    port: Annotated[int | None, typer.Option(help="API port (default: a free one).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for demo-report.json and demo-report.png.")] = Path("."),
    keep: Annotated[bool, typer.Option(help="Keep the demo's Redis keys, adapters and logs.")] = False,
    run_timeout: Annotated[
        float, typer.Option(help="Longest wait for one training run (snapshot, training, gate) in seconds.")
    ] = 1800.0,
    model: Annotated[
        str, typer.Option(help="smollm2 (SmolLM2-135M-Instruct, the default base model) or toy (the 2.2M demo model).")
    ] = "smollm2",
    method: Annotated[
        str | None,
        typer.Option(
            help="dpo (preference pairs) or kto (every thumb, unpaired, TRL's KTOTrainer) on the same "
            "feedback (default: training.method)."
        ),
    ] = None,
    canary_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="Share of users a new adapter serves first as a canary, decided by their votes (0: "
            "straight promotion).",
        ),
    ] = 0.0,
) -> None:
    """The whole loop on this machine: baseline, simulated feedback, training, hot-swap, measured per round."""
    from demo.profiles import PROFILES
    from demo.run import DemoError, run_demo
    from services.cli.common import configure_logging, fail, require_engine
    from services.core.config import get_settings

    if model not in PROFILES:
        raise fail(f"--model must be one of {', '.join(PROFILES)}, not {model!r}")
    if method not in (None, "dpo", "kto"):
        raise fail(f"--method must be dpo or kto, not {method!r}")
    profile = PROFILES[model]
    settings = get_settings()
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}))
    require_engine()
    sim = simulation_settings(
        profile.simulate,
        users=users, likes=likes, rate_probability=rate_probability, correction_probability=correction_probability,
        noise_rate=noise, adversarial_fraction=adversarial, adversarial_volume=adversarial_volume, seed=seed,
    )  # fmt: skip
    options = demo_options(
        profile, rounds, final_chats, method, identity_samples=samples, questions=questions, port=port, out_dir=out,
        keep=keep, run_timeout_s=run_timeout, canary_share=canary_share,
    )  # fmt: skip
    try:
        report = run_demo(settings, options, sim, echo=typer.echo)
    except DemoError as error:
        raise fail(str(error)) from None
    goals = report["targets"]
    typer.echo(
        f"\ntarget rate {goals['target_rate']['before']:.1%} -> {goals['target_rate']['after']:.1%} · accuracy drop "
        f"{goals['accuracy_drop_points']:+.1f} points · pairs to 90%: {goals['pairs_to_90'] or '-'} · "
        f"{report['wall_s'] / 60:.1f} min · report {report['files']['json']}, chart {report['files']['chart']}"
    )
