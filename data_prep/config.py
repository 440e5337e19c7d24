"""``PrepConfig``: how raw videos become clips and shards; one place for every default.

The manifest records the whole config, and every chunk and the dataset carry its fingerprint
(``PrepConfig.fingerprint()``), so shards cut with different settings never mix silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Fields that change how fast a run goes but never what it writes: left out of the fingerprint.
_RUNTIME_FIELDS = frozenset({"workers"})


class PrepError(ValueError):
    """A sharding run cannot start or go on; the message names the file/URL and what to do."""


class PrepConfig(BaseModel):
    """Clip shape, filters, decompression-bomb limits, shard sizes and encoding settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- clips
    fps: float = Field(8.0, gt=0, description="clip frame rate; sources are resampled by time")
    frames: int = Field(17, ge=2, description="frames per clip")
    size: int = Field(256, ge=16, multiple_of=2, description="square side (yuv420p needs even)")
    # ---- split: by a stable hash of the source's name, so no validation video feeds train
    val_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # Input names (relative, fnmatch patterns) of synthetic videos: marked ``synthetic`` in the
    # manifest and in every clip's json, and always in train, so validation stays real video.
    synthetic: tuple[str, ...] = ()
    # ---- filters
    # Mean absolute difference of consecutive clip frames, as 8-bit grayscale on frames 64 px
    # wide. Frozen frames score 0; a talking head with sensor noise scores about 1-3.
    motion_threshold: float = Field(1.0, ge=0.0)
    # PySceneDetect ContentDetector threshold (its default; mean HSV change, 0-255 scale).
    scene_threshold: float = Field(27.0, gt=0.0)
    # A cut closer than this to the previous one is ignored (flashes, strobes).
    min_scene_s: float = Field(0.5, ge=0.0)
    # ---- decompression-bomb limits, checked on the *declared* stream before any decoding
    max_width: int = Field(7680, ge=16)
    max_height: int = Field(7680, ge=16)
    max_pixels: int = Field(7680 * 4320, ge=256)
    max_duration_s: float = Field(2 * 3600.0, gt=0)
    max_frames: int = Field(2 * 3600 * 60, ge=1)
    # ---- shards
    shard_max_mb: float = Field(256.0, gt=0)
    shard_max_samples: int = Field(5000, ge=1)
    # Inputs per chunk (on average): a chunk is the unit of resumption, retry and Prefect task.
    chunk_inputs: int = Field(32, ge=1)
    # ---- encoding (libx264, yuv420p, one thread per clip so output bytes are reproducible)
    crf: int = Field(20, ge=0, le=51)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"
    ] = "veryfast"
    # ---- runtime only (not in the fingerprint): decode/encode processes, 0 = one per core
    workers: int = Field(0, ge=0)

    def fingerprint(self) -> str:
        """Hash of every field that changes the output (not ``workers``): 16 hex characters."""
        fields = self.output_fields()
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def output_fields(self) -> dict[str, Any]:
        """The fields the fingerprint covers (what a mismatch message compares), as JSON types.

        ``synthetic`` counts only when set, so datasets cut before it existed keep their
        fingerprint."""
        fields = self.model_dump(mode="json", exclude=set(_RUNTIME_FIELDS))
        if not fields["synthetic"]:
            del fields["synthetic"]
        return fields


def load_prep_config(path: str | Path | None = None, **overrides: Any) -> PrepConfig:
    """A ``PrepConfig`` from an optional YAML file plus field overrides (``None`` = keep)."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "prep options"
    if path:
        path = Path(path)
        if not path.is_file():
            raise PrepError(f"{source}: prep config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise PrepError(f"{source}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise PrepError(f"{source}: top level must be a mapping of PrepConfig fields")
        raw.update(loaded)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PrepConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise PrepError(f"{source}: invalid prep config\n  " + "\n  ".join(lines)) from None
