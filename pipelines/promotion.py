"""The MLflow model registry side of the curriculum: one registered model per curriculum.

Each stage's final weights become a model version with alias ``{stage}-candidate``; a passed
gate moves alias ``{stage}``; the last stage also moves ``champion``. Aliases, not the
deprecated registry stages. ``mardini promote`` and the ``promote-checkpoint`` flow use the
same functions by hand.
"""

from __future__ import annotations

import logging

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"


def registered_name(curriculum: str) -> str:
    """The registered model of a curriculum."""
    return f"mardini-{curriculum}"


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None (also when the model does not exist yet)."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_aliases(client: MlflowClient, name: str, version: str, aliases: list[str]) -> None:
    """Point each alias at ``version`` (moving it from any older version)."""
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
        log.info("%s@%s -> version %s", name, alias, version)


def promote(
    client: MlflowClient, name: str, version: str, stage: str, last: bool = False
) -> list[str]:
    """Move ``{stage}`` (and ``champion`` for the last stage) to ``version``; returns the aliases."""
    aliases = [stage] + ([CHAMPION] if last else [])
    set_aliases(client, name, version, aliases)
    return aliases
