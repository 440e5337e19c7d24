"""A stage's export: what names one (URL, stage dir, stage name), and exports written before the
metadata file was renamed (``config.json``), which must keep loading and be replaced cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mardini.export import (
    METADATA,
    WEIGHTS,
    export_final,
    export_url,
    read_final,
    read_final_meta,
    superseded_url,
)
from mardini.layout import final_url, stage_dir


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"generator.w": torch.full((2, 3), value)}


def test_a_source_names_the_same_export_three_ways(tmp_path):
    store = str(tmp_path / "store")
    final = export_final(_state(1.0), {"stage": "dm"}, stage_dir(store, "c", "dm"))
    assert final == final_url(store, "c", "dm")
    assert export_url(final) == final
    assert export_url(stage_dir(store, "c", "dm")) == final
    assert export_url("dm", store=store, curriculum="c") == final
    with pytest.raises(FileNotFoundError, match="expected a final/ export"):
        export_url(str(tmp_path / "nowhere"))


def test_an_export_with_the_old_metadata_name_loads_and_is_replaced(tmp_path):
    """Exports written before metadata.json was named so hold config.json: they load, and a
    retrain replaces it (the old export kept under superseded/, as for any export)."""
    final = tmp_path / "runs" / "c" / "dm" / "final"
    final.mkdir(parents=True)
    save_file(_state(1.0), str(final / WEIGHTS))
    (final / "config.json").write_text(json.dumps({"stage": "dm", "weights_sha256": None}))
    state, meta = read_final(str(final))
    assert meta["stage"] == "dm" and torch.equal(state["generator.w"], _state(1.0)["generator.w"])
    assert export_url(str(final.parent)) == str(final)

    # With a digest recorded, a retrain with other weights keeps the old export.
    from mardini.export import file_sha256

    old_sha = file_sha256(final / WEIGHTS)
    (final / "config.json").write_text(json.dumps({"stage": "dm", "weights_sha256": old_sha}))
    export_final(_state(2.0), {"stage": "dm"}, str(final.parent))
    assert not (final / "config.json").exists() and (final / METADATA).exists()
    assert read_final_meta(str(final))["weights_sha256"] != old_sha
    kept, _ = read_final(superseded_url(str(final), old_sha))
    assert torch.equal(kept["generator.w"], _state(1.0)["generator.w"])
