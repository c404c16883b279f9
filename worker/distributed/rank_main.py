"""A tensor-parallel rank other than 0: ``python -m kvmesh.worker.distributed.rank_main RANK`` with its
settings as JSON on stdin (written by RankSupervisor). It builds its ModelRunner shard, joins the
group and runs every step rank 0 broadcasts until STOP; it exits once rank 0 is gone."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from kvmesh.logs import setup_logging


def main(argv: list[str]) -> int:
    rank = int(argv[1])
    spec = json.loads(sys.stdin.read())
    setup_logging(spec["log_level"])
    log = logging.getLogger("kvmesh.worker.distributed")
    from kvmesh.worker.distributed.ranks import watch_parent

    watch_parent()
    import torch

    from kvmesh.worker.distributed.ranks import START_TIMEOUT, join_group, rank_device
    from kvmesh.worker.engine.config import EngineConfig
    from kvmesh.worker.engine.model_runner import ModelRunner
    from kvmesh.worker.model import loader

    torch.set_num_threads(spec["threads"])
    config = EngineConfig(**spec["config"])
    model_dir = Path(spec["model_dir"])
    device = rank_device(torch.device(spec["device"]), rank)
    store = torch.distributed.TCPStore(
        "127.0.0.1", spec["port"], config.tensor_parallel_size, False, timeout=START_TIMEOUT
    )
    group = join_group(store, rank, config.tensor_parallel_size, device)
    runner = ModelRunner(config, model_dir, loader.load_config(model_dir), group=group)
    log.info("Tensor-parallel rank %d of %d ready on %s", rank, config.tensor_parallel_size, device)
    runner.serve_steps()
    log.debug("Tensor-parallel rank %d stopped", rank)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
