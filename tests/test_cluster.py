"""Live-cluster check of the Kubeflow launcher; runs only where KUBECONFIG points at a cluster
with the training operator (v1 API), the `mardini` namespace and the image in MARDINI_K8S_IMAGE."""

from __future__ import annotations

import os

import pytest

from mardini.config import load_config
from pipelines.launchers.kubeflow import run_pytorchjob
from tests.conftest import CONFIGS

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG (a live cluster)"
    ),
]


def test_tiny_mar_stage_runs_as_a_pytorchjob():
    """Two CPU pods (Master + Worker) train the tiny `mar` stage; raises with the pod logs if not."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    run_pytorchjob(cfg, "mar", nnodes=2, nproc_per_node=1, timeout_s=1800, poll_s=10)
