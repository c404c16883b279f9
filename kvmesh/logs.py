"""One log format for every kvmesh process."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    for noisy in ("grpc", "asyncio"):  # their DEBUG output drowns kvmesh's own
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
