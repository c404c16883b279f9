"""A draft model: a smaller model sharing the target's tokenizer proposes k tokens, one decode
step at a time, on its own paged KV cache.

Each target sequence has a shadow sequence here that shares its token list and owns the draft's
block table. A step first feeds the draft every token it has not seen (the whole prompt the first
time, then the one or two tokens the last verification added), samples the first proposal, then
feeds each proposal to get the next. After verification the shadow keeps only the KV of tokens
the target accepted, and the blocks past them go back to the draft's pool.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.model_runner import ModelRunner
from kvmesh.worker.engine.sampler import sampling_probs
from kvmesh.worker.engine.scheduler import SchedulerOutput
from kvmesh.worker.engine.sequence import Sequence
from kvmesh.worker.model import loader

log = logging.getLogger(__name__)


class DraftProposer:
    def __init__(self, config: EngineConfig, vocab_size: int) -> None:
        files = loader.resolve_model(config.speculative_model or "")
        hf_config = loader.load_config(files.directory)
        if int(hf_config.vocab_size) != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({hf_config.vocab_size}) differs from the target's "
                f"({vocab_size}): a draft must share the target's tokenizer"
            )
        # A placeholder pool of 2 blocks until the target has sized its own (allocate_pool).
        draft_config = replace(
            config,
            model=str(files.directory),
            served_model_name=None,
            num_blocks=2,
            enable_prefix_caching=False,
            enforce_eager=True,
            speculative=None,
            speculative_model=None,
            # fp8 and none apply to any draft; a checkpoint format is the target's own
            quantization=config.quantization if config.quantization in ("none", "fp8") else "auto",
        )
        self.config = config
        self.runner = ModelRunner(draft_config, files.directory, hf_config)
        self.blocks = BlockManager(2, config.block_size, enable_prefix_caching=False)
        self.shadows: dict[str, Sequence] = {}
        self.name = files.name

    @property
    def block_bytes(self) -> int:
        return self.runner.block_bytes

    def allocate_pool(self, num_blocks: int) -> None:
        """One draft block per target block (the draft's cache mirrors the target's tokens), or
        on a GPU as many as the memory the target left holds: the draft's pool comes on top of
        gpu_memory_utilization. A sequence the draft's pool cannot hold decodes without proposals."""
        r = self.runner
        r.kv_cache = None
        if r.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(r.device)
            fits = int(free * 0.8) // r.block_bytes  # headroom for the draft's CUDA graphs
            if fits < num_blocks:
                log.warning(
                    "The draft model's KV pool holds %d of the target's %d blocks; lower "
                    "gpu_memory_utilization to leave it room",
                    fits,
                    num_blocks,
                )
            num_blocks = max(2, min(num_blocks, fits))
        r.num_blocks = num_blocks
        shape = (2, r.num_layers, num_blocks, r.block_size, r.num_kv_heads, r.head_dim)
        alloc = torch.empty if r.device.type == "cpu" else torch.zeros
        r.kv_cache = alloc(*shape, dtype=r.kv_dtype, device=r.device)  # the target's --kv-cache-dtype
        self.blocks = BlockManager(num_blocks, r.block_size, enable_prefix_caching=False)
        if r.device.type == "cuda" and not self.config.enforce_eager and r.backend.name != "torch":
            from kvmesh.worker.engine.cuda_graphs import CudaGraphRunner

            r.graphs = CudaGraphRunner(
                r.model, r.kv_cache, self.config.max_num_seqs, r.max_positions, r.block_size, r.device
            )
            r.graphs.capture()
        log.info("Loaded draft model %s: %d layers, %d KV blocks", self.name, r.num_layers, num_blocks)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], limits: list[int]) -> tuple[list[list[int]], list]:
        """Up to ``limits[i]`` proposals for each sequence, appended to its ``token_ids`` as they
        are drawn; returns them and, for sampled requests, the draft distributions ``[k, V]`` they
        came from (None for greedy ones)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active, feed = [], []
        for i, (seq, k) in enumerate(zip(seqs, limits)):
            if seq.num_tokens + k - 1 > self.runner.max_positions:
                continue  # past the draft's context
            shadow = self._shadow(seq)
            n = seq.num_tokens - shadow.num_computed_tokens
            if self._reserve(shadow, n + k - 1, seqs):
                active.append(i)
                feed.append(n)
        while active:
            shadows = [self.shadows[seqs[i].request_id] for i in active]
            logits = self._logits(SchedulerOutput(shadows, feed))
            greedy = logits.argmax(dim=-1).tolist()
            for row, i in enumerate(active):
                seq = seqs[i]
                token = greedy[row]
                if not seq.params.greedy:
                    q = sampling_probs(logits[row], seq.params)
                    gen = seq.generator
                    if gen is not None and gen.device != q.device:
                        q = q.cpu()
                    token = int(torch.multinomial(q, 1, generator=gen).item())
                    probs[i].append(q)
                shadows[row].num_computed_tokens += feed[row]
                seq.token_ids.append(token)
                drafts[i].append(token)
            active = [i for i in active if len(drafts[i]) < limits[i]]
            feed = [1] * len(active)
        return drafts, [torch.stack(p) if p else None for p in probs]

    def after_verify(self, seq: Sequence) -> None:
        """Keeps the draft's KV of the tokens the target kept; frees the blocks past them."""
        shadow = self.shadows.get(seq.request_id)
        if shadow is None:
            return
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, seq.num_computed_tokens)
        self.blocks.rollback(shadow)

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.blocks.free_sequence(shadow)

    def _shadow(self, seq: Sequence) -> Sequence:
        shadow = self.shadows.get(seq.request_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.token_ids, seq.params, root_hash=0)
            self.shadows[seq.request_id] = shadow
        shadow.token_ids = seq.token_ids  # shares the list: appended tokens are the draft's inputs
        return shadow

    def _reserve(self, shadow: Sequence, num_tokens: int, step_seqs: list[Sequence]) -> bool:
        if self.blocks.allocate_slots(shadow, num_tokens):
            return True
        # The pool is full of sequences that are not speculating now (waiting, or past the batch
        # limit): drop their draft caches, which are recomputed if they speculate again.
        keep = {s.request_id for s in step_seqs}
        for rid in [r for r in self.shadows if r not in keep]:
            self.release(rid)
        return self.blocks.allocate_slots(shadow, num_tokens)

    def _logits(self, out: SchedulerOutput) -> torch.Tensor:
        r = self.runner
        step = r.host_inputs(out)
        if r.graphs is not None and r.graphs.can_run(step):
            logits, _ = r.graphs.run(step)
            return logits
        input_ids, positions, meta, rows, _ = r._device_inputs(step)
        hidden = r.model(input_ids, positions, r.kv_cache, meta)
        return r.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
