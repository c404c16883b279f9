"""A scheduled step's host inputs on the wire: rank 0 broadcasts each step to the other ranks as two
int64 tensors over the host (gloo) group, a fixed header then the payload it describes."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvmesh.worker.engine.model_runner import StepInputs

HEADER = 8  # command, tokens, sequences, sampled rows, max query len, max seq len, max blocks, table ids
STEP, STOP = 1, 2


def stop_header() -> torch.Tensor:
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0] = STOP
    return header


def pack(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload): the payload holds ids, positions, slots, query starts, sequence lengths,
    block-table lengths, the block tables end to end and the sampled rows."""
    tables = step.block_tables
    table_ids = sum(len(t) for t in tables)
    header = torch.tensor(
        [
            STEP,
            len(step.input_ids),
            len(step.seq_lens),
            len(step.logits_rows),
            step.max_query_len,
            step.max_seq_len,
            step.max_blocks,
            table_ids,
        ],
        dtype=torch.int64,
    )
    values = chain(
        step.input_ids,
        step.positions,
        step.slot_mapping,
        step.query_start_loc,
        step.seq_lens,
        (len(t) for t in tables),
        chain.from_iterable(tables),
        step.logits_rows,
    )
    return header, torch.tensor(list(values), dtype=torch.int64)


def payload_size(header: torch.Tensor) -> int:
    _, tokens, seqs, rows, _, _, _, table_ids = header.tolist()
    return 3 * tokens + (seqs + 1) + 2 * seqs + table_ids + rows


def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
    from kvmesh.worker.engine.model_runner import StepInputs

    _, tokens, seqs, rows, max_query_len, max_seq_len, max_blocks, _ = header.tolist()
    values = payload.tolist()
    at = 0

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return values[at - n : at]

    ids, positions, slots = take(tokens), take(tokens), take(tokens)
    qsl, seq_lens, lengths = take(seqs + 1), take(seqs), take(seqs)
    tables = [take(n) for n in lengths]
    return StepInputs(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_tables=tables,
        logits_rows=take(rows),
        sample_seqs=[],  # only rank 0 samples
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        max_blocks=max_blocks,
    )
