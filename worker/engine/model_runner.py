"""Loads the model, owns the KV cache, and runs one scheduled step."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from kvmesh.worker.attention import AttentionMetadata, get_backend, kv_quant
from kvmesh.worker.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from kvmesh.worker.engine.sampler import sample
from kvmesh.worker.engine.scheduler import SchedulerOutput
from kvmesh.worker.model import loader, quant
from kvmesh.worker.model.llama import build_model
from kvmesh.worker.model.parallel import SINGLE, ParallelGroup, check_shardable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One scheduled step on the host: flat per-token lists and per-sequence layout."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]  # each sequence's own table, unpadded
    logits_rows: list[int]  # rows whose next token is sampled
    sample_seqs: list
    max_query_len: int
    max_seq_len: int
    max_blocks: int


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type: the model's (auto) or float8 e4m3 (fp8, kv_quant.py)."""
    return kv_quant.FP8 if name == "fp8" else model_dtype


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(dtypes)})")
    return dtypes[name]


class ModelRunner:
    """One rank's model shard and KV pool. With tensor_parallel_size > 1 the engine's runner is rank
    0: it starts ranks 1..N-1 (kvmesh.worker.distributed), broadcasts each step to them and samples;
    they build this same class with their ``group`` and run ``serve_steps``."""

    def __init__(self, config: EngineConfig, model_dir, hf_config, group: ParallelGroup | None = None):
        self.config = config
        self.ranks = None  # rank 0 of several: its RankSupervisor
        size = config.tensor_parallel_size
        device = _resolve_device(config.device)
        if size > 1 and group is None:
            from kvmesh.worker.distributed.ranks import RankSupervisor

            check_shardable(hf_config, size)  # before any process starts
            if getattr(config, "speculative_method", None):
                raise ValueError("speculative decoding with tensor_parallel_size > 1 is not supported yet")
            self.ranks = RankSupervisor(config, model_dir, device)
            weakref.finalize(self, self.ranks.stop)  # also at interpreter exit
            group = self.ranks.group
        self.group = group or SINGLE
        if self.group.size > 1:
            from kvmesh.worker.distributed.ranks import rank_device

            device = rank_device(device, self.group.rank)
        self.device = device
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.kv_dtype = _resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        self.hf_config = hf_config
        self.block_size = config.block_size
        self.backend = get_backend(config.attention_backend, self.device, config.kv_cache_dtype)
        model_max = int(getattr(hf_config, "max_position_embeddings", 4096))
        self.max_positions = min(config.max_model_len or model_max, model_max)
        torch.manual_seed(config.seed)
        source = loader.locate_model(config.model)
        gguf_file = source.location if source.kind == "gguf" else None
        self.quant = quant.resolve(config.quantization, hf_config, gguf_file=gguf_file, device=self.device)
        if self.quant is not None and self.group.size > 1:
            raise ValueError("quantization with tensor_parallel_size > 1 is not supported yet")
        if self.quant is not None:
            log.info(
                "Quantization: %s%s", self.quant.method, "" if self.quant.from_checkpoint else " (at load)"
            )
        self.linear_method = quant.method_for(self.quant)
        self.model = build_model(
            hf_config,
            self.backend,
            self.max_positions,
            self.device,
            self.dtype,
            self.group,
            self.linear_method,
        )
        state = None
        if config.load_format == "dummy":
            self.model.init_random(config.seed)
        else:
            state = loader.load_state_dict(model_dir)
            method = self.linear_method
            self.model.load_weights(method.checkpoint_tensors(state) if method is not None else state)
        self.model.eval()
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_layers = len(self.model.layers)
        self.kv_scales = self._set_kv_scales(state)  # before the profiling run, which writes fp8
        # Every rank holds the same blocks (of its own KV heads): the smallest pool any rank fits.
        self.num_blocks = self.group.min_int(config.num_blocks or self._blocks_from_memory())
        # One pool: [2 (k, v), layers, blocks, block_size, kv_heads, head_dim]. On the CPU it is
        # left uninitialized: the kernel hands out zero pages as blocks are first written, so the
        # pool takes resident memory as the cache fills, not all at start.
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        self.kv_cache = alloc(
            2,
            self.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        log.info(
            "KV cache: %s, %d blocks of %d tokens (%.2f GiB)",
            "fp8 (float8_e4m3fn)" if self.kv_scales is not None else self.kv_dtype,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_bytes / 2**30,
        )
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and self.backend.name != "torch":
            from kvmesh.worker.engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(
                self.model,
                self.kv_cache,
                config.max_num_seqs,
                self.max_positions,
                self.block_size,
                self.device,
            )
            self.graphs.capture()
        if self.ranks is not None:  # every rank is now waiting for steps (STOP may go on the wire)
            self.ranks.ready = True

    def _set_kv_scales(self, state) -> torch.Tensor | None:
        """An fp8 cache's per-layer scales (float32 ``[layers, 2]`` on the device, from the
        checkpoint or 1.0), handed to each attention layer as its ``[k_scale, v_scale]`` row: made
        once here, so steps and CUDA graphs read them where they are. Every tensor-parallel rank
        reads the same per-layer scalars. None for a 16-bit cache."""
        if self.kv_dtype != kv_quant.FP8:
            return None
        scales, source = kv_quant.scales_from_checkpoint(state or {}, self.num_layers)
        scales = scales.to(self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.kv_scale = scales[i]
        log.info("KV cache dtype fp8 (e4m3): per-layer k/v scales from %s", source)
        return scales

    @property
    def block_bytes(self) -> int:
        """One block's keys and values over every layer: 1 byte an element for fp8."""
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _blocks_from_memory(self) -> int:
        if self.device.type != "cuda":
            return max(2, CPU_KV_CACHE_BYTES // self.block_bytes)
        # Profile one full-budget prefill to learn the activation peak, then give the rest to the pool.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - peak - used_by_others
        blocks = int(budget // self.block_bytes)
        if blocks < 2:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        log.info(
            "Sized KV cache from memory: %d blocks (%.2f GiB)", blocks, blocks * self.block_bytes / 2**30
        )
        return blocks

    def _profile_run(self) -> None:
        n = min(self.config.max_num_batched_tokens, self.max_positions)
        dummy_cache = torch.zeros(
            2,
            self.num_layers,
            -(-n // self.block_size),
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        meta = AttentionMetadata.whole_prompt(n, self.block_size, self.device)
        with torch.inference_mode():
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            hidden = self.model(ids, torch.arange(n, device=self.device), dummy_cache, meta)
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        del dummy_cache

    def host_inputs(self, out: SchedulerOutput) -> StepInputs:
        """Flattens a scheduled step into host lists (no device work)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sample_seqs = []
        bs = self.block_size
        for seq, n in zip(out.seqs, out.num_tokens):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:  # a decode: no ranges or generators
                ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:  # reached the end of known tokens: sample the next one
                logits_rows.append(qsl[-1] - 1)
                sample_seqs.append(seq)
        tables = [s.block_table for s in out.seqs]
        return StepInputs(
            input_ids=ids,
            positions=positions,
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=tables,
            logits_rows=logits_rows,
            sample_seqs=sample_seqs,
            max_query_len=max(out.num_tokens),
            max_seq_len=max(seq_lens),
            max_blocks=max(len(t) for t in tables),
        )

    def prepare(self, out: SchedulerOutput):
        """Model inputs of a step as device tensors; returns them and the rows to sample."""
        return self._device_inputs(self.host_inputs(out))

    def _device_inputs(self, step: StepInputs):
        tables = [t + [0] * (step.max_blocks - len(t)) for t in step.block_tables]
        meta = AttentionMetadata(
            query_start_loc=self._to_device(step.query_start_loc, torch.int32),
            seq_lens=self._to_device(step.seq_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            slot_mapping=self._to_device(step.slot_mapping, torch.int64),
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            query_start_loc_cpu=step.query_start_loc,
            seq_lens_cpu=step.seq_lens,
        )
        input_ids = self._to_device(step.input_ids, torch.long)
        pos = self._to_device(step.positions, torch.long)
        return input_ids, pos, meta, step.logits_rows, step.sample_seqs

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Host lists go through pinned memory with asynchronous copies on the GPU."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=self.device)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list, list[int], list | None]:
        """Runs the step; returns the sequences that sampled, their new tokens and, when any of
        them asked, their tokens' log-probabilities (sampler.sample)."""
        step = self.host_inputs(out)
        if self.ranks is None:
            logits, greedy = self._logits(step)
        else:  # the other ranks run the same step on their shards
            with self.ranks.lock:
                try:
                    self.ranks.send_step(step)
                    logits, greedy = self._logits(step)
                except Exception:
                    self.ranks.after_step_error()
                    raise
        if not step.sample_seqs:
            return [], [], None
        return step.sample_seqs, *sample(logits, step.sample_seqs, greedy)

    def _logits(self, step: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step's forward pass: float32 logits of its sampled rows (None when none samples)
        and, from a decode CUDA graph, their argmax."""
        if self.graphs is not None and self.graphs.can_run(step):
            return self.graphs.run(step)
        input_ids, positions, meta, logits_rows, _ = self._device_inputs(step)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        if not logits_rows:
            return None, None
        rows = self._to_device(logits_rows, torch.long)
        return self.model.compute_logits(hidden[rows]), None

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """Ranks 1..N-1: run every step rank 0 broadcasts, until it broadcasts STOP."""
        from kvmesh.worker.distributed.ranks import receive_step

        while (step := receive_step(self.group)) is not None:
            self._logits(step)

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (rank 0; nothing to do on a single rank)."""
        if self.ranks is not None:
            self.ranks.stop()
