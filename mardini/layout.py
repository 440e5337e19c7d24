"""Where things live in the store: one home for the URLs every layer builds.

    {store}/shards/{dataset}/{split}/shard-*.tar    mp4 shards (``mardini prep``)
    {shards}/latents/{resolution}px-{fingerprint}/   their latent cache (``mardini.data.latents``)
    {store}/runs/{curriculum}/{stage}/               a stage: checkpoints, final/, eval/, latents/

Only string work here (no torch, no I/O), so every layer may import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mardini.storage import join

if TYPE_CHECKING:
    from mardini.config import CurriculumConfig, StageConfig


def shards_url(cfg: CurriculumConfig, store: str, stage: StageConfig | None = None) -> str:
    """The mp4 shard root a stage reads: its own ``dataset`` (a URL, or a name under
    ``{store}/shards``), else ``data.shards``, else ``{store}/shards/{data.dataset}``."""
    if stage is not None and stage.dataset:
        return stage.dataset if "/" in stage.dataset else join(store, "shards", stage.dataset)
    return cfg.data.shards or join(store, "shards", cfg.data.dataset)


def stage_dir(store: str, curriculum: str, stage: str) -> str:
    """``{store}/runs/{curriculum}/{stage}``."""
    return join(store, "runs", curriculum, stage)


def final_url(store: str, curriculum: str, stage: str) -> str:
    """A stage's final export: ``{stage_dir}/final``."""
    return join(stage_dir(store, curriculum, stage), "final")
