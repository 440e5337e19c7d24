"""The launch contract: the one command every training replica runs, locally and in a PyTorchJob,
and the error every launcher raises when a job fails.

Elastic: the nodes meet at a c10d rendezvous (``$PET_RDZV_ENDPOINT``, hosted by the agent
there) instead of a fixed master and node rank, and torchrun restarts the whole worker group
up to ``$PET_MAX_RESTARTS`` times when a rank dies; the restarted ranks resume from the stage's
``latest`` checkpoint. ``$PET_NNODES`` is ``N`` or ``MIN:MAX`` (the operator writes ``N:N``).
"""

from __future__ import annotations

LAUNCH_CONTRACT = (
    "torchrun --nnodes $PET_NNODES --nproc-per-node $PET_NPROC_PER_NODE "
    "--rdzv-backend $PET_RDZV_BACKEND --rdzv-endpoint $PET_RDZV_ENDPOINT --rdzv-id $PET_RDZV_ID "
    "--max-restarts $PET_MAX_RESTARTS "
    "-m mardini.train --config {config} --stage {stage}"
)


# torchrun shares its rendezvous TCPStore with the workers by default, and keeps it across
# restarts of the worker group: the restarted ranks then read the dead ranks' Gloo/NCCL
# addresses and fail ("Gloo connectFullMesh failed ... Connection refused", or hang), seen
# here in 4 of 6 restarts (pytorch/pytorch#135712). A store per round avoids it. Both
# launchers set this on every node.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class LaunchError(RuntimeError):
    """A training job failed; the message names the node/rank and holds its last log lines."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message + ("\n--- last log lines ---\n" + "\n".join(tail) if tail else ""))
        self.tail = tail


def contract_words(config_path: str, stage: str) -> list[str]:
    """The contract as argv words, ``$PET_*`` references unexpanded."""
    return LAUNCH_CONTRACT.format(config=config_path, stage=stage).split()
