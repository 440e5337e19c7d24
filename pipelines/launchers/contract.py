"""The launch contract: the one command every training replica runs, locally and in a PyTorchJob."""

from __future__ import annotations

LAUNCH_CONTRACT = (
    "torchrun --nnodes $PET_NNODES --nproc-per-node $PET_NPROC_PER_NODE "
    "--node-rank $PET_NODE_RANK --master-addr $PET_MASTER_ADDR --master-port $PET_MASTER_PORT "
    "-m mardini.train --config {config} --stage {stage}"
)


def contract_words(config_path: str, stage: str) -> list[str]:
    """The contract as argv words, ``$PET_*`` references unexpanded."""
    return LAUNCH_CONTRACT.format(config=config_path, stage=stage).split()
