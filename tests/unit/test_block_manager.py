"""Block pool and prefix cache: sharing, refcounts, LRU eviction, tenant isolation, events."""

from __future__ import annotations

from kvmesh.prefix import block_hashes, root_hash
from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.engine.scheduler import Scheduler
from kvmesh.worker.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], salt: str = "", rid: str = "r", priority: int = 0) -> Sequence:
    seq = Sequence(rid, list(tokens), SamplingParams(), root_hash("m", salt), priority=priority)
    seq.update_block_hashes(BS)
    return seq


def run_prefill(bm: BlockManager, seq: Sequence) -> int:
    cached = bm.admit(seq, seq.num_tokens)
    assert cached is not None
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    return cached


def test_sequence_hashes_match_the_shared_prefix_module():
    tokens = list(range(1, 12))
    seq = make_seq(tokens, salt="tenant")
    assert seq.block_hashes == block_hashes(tokens, BS, model="m", cache_salt="tenant")
    assert len(seq.block_hashes) == 2  # the partial third block has no key


def test_second_sequence_reuses_full_blocks_and_shares_them():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(10)), rid="a")
    assert run_prefill(bm, a) == 0
    b = make_seq([*range(8), 99, 98, 97], rid="b")
    assert run_prefill(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free_sequence(a)
    assert bm.ref_counts[b.block_table[0]] == 1


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(16, BS)
    run_prefill(bm, make_seq(list(range(8)), rid="a"))
    again = make_seq(list(range(8)), rid="b")
    assert run_prefill(bm, again) == 4


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(8)), rid="a")
    run_prefill(bm, a)
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    # A revisit after the free still hits.
    b = make_seq([*range(8), 5], rid="b")
    assert run_prefill(bm, b) == 8
    bm.free_sequence(b)
    # A different prompt needing all 4 blocks evicts the cached ones; removal events name them.
    bm.drain_events()
    c = make_seq(list(range(100, 116)), rid="c")
    assert run_prefill(bm, c) == 0
    _, removed = bm.drain_events()
    assert set(removed) == set(a.block_hashes)
    assert all(h not in bm.cached for h in a.block_hashes)


def test_eviction_takes_a_chains_tail_before_its_head():
    bm = BlockManager(4, BS)
    a = make_seq([*range(12), 0], rid="a")  # 3 full blocks + 1 partial
    run_prefill(bm, a)
    bm.free_sequence(a)
    bm.drain_events()
    b = make_seq([7, 7, 7, 7, 7], rid="b")  # needs two blocks from the free list's head
    run_prefill(bm, b)
    _, removed = bm.drain_events()
    # The partial block (no hash) goes first, then the chain's last block; the head survives.
    assert removed == [a.block_hashes[2]]
    assert a.block_hashes[0] in bm.cached and a.block_hashes[1] in bm.cached


def test_cache_salt_separates_tenants():
    bm = BlockManager(16, BS)
    run_prefill(bm, make_seq(list(range(9)), salt="t1", rid="a"))
    assert run_prefill(bm, make_seq(list(range(9)), salt="t2", rid="b")) == 0
    assert run_prefill(bm, make_seq(list(range(9)), salt="t1", rid="c")) == 8


def test_prefix_caching_off_never_hits_or_emits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    run_prefill(bm, make_seq(list(range(9)), rid="a"))
    assert run_prefill(bm, make_seq(list(range(9)), rid="b")) == 0
    assert bm.drain_events() == ([], [])


def test_stored_events_follow_computed_blocks():
    bm = BlockManager(16, BS)
    seq = make_seq(list(range(10)), rid="a")
    bm.admit(seq, 6)
    seq.num_computed_tokens = 6
    bm.register_computed(seq)
    stored, _ = bm.drain_events()
    assert stored == seq.block_hashes[:1]


def test_admission_refuses_without_changing_state_when_the_pool_is_short():
    bm = BlockManager(2, BS)
    seq = make_seq(list(range(12)), rid="a")
    assert bm.admit(seq, 12) is None
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_scheduler_chunks_prefill_under_the_token_budget_and_mixes_decodes():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a = make_seq(list(range(3)), rid="a")
    sched.add(a)
    out = sched.schedule()
    assert out.num_tokens == [3]
    a.num_computed_tokens = 3
    a.token_ids.append(1)  # sampled
    b = make_seq(list(range(50, 75)), rid="b")
    sched.add(b)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert out.num_tokens == [1, 9]  # a decode plus a 9-token prefill chunk


def test_scheduler_orders_waiting_by_priority_then_arrival():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    low = make_seq([1, 2], rid="low", priority=5)
    first = make_seq([1, 2], rid="first", priority=0)
    second = make_seq([1, 2], rid="second", priority=0)
    for s in (low, first, second):
        sched.add(s)
    assert [s.request_id for s in sched.schedule().seqs] == ["first"]


def test_scheduler_preempts_the_latest_lowest_priority_sequence_when_blocks_run_out():
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a = make_seq([1, 2, 3, 4, 5, 6, 7], rid="a")
    b = make_seq([9, 9, 9, 9, 9, 9, 9], rid="b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.num_tokens == [7, 7]
    for s in (a, b):
        s.num_computed_tokens = 7
        s.token_ids += [1, 1]  # pretend two tokens were sampled; each now needs a third block
        s.num_computed_tokens = 8
    out = sched.schedule()
    assert out.num_preempted == 1
    assert [s.request_id for s in out.seqs] == ["a"]
    assert sched.num_waiting == 1 and b.block_table == [] and b.num_computed_tokens == 0


def test_a_long_prefill_ahead_in_priority_never_takes_the_decodes_tokens():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    shorts = [make_seq([1, 2], rid=f"s{i}") for i in range(3)]
    for s in shorts:
        sched.add(s)
    assert sched.schedule().num_tokens == [2, 2, 2]
    for s in shorts:
        s.num_computed_tokens = 2
        s.token_ids.append(7)  # sampled: each is now a decode
    urgent = make_seq(list(range(100, 140)), rid="urgent", priority=-1)  # sorts before the decodes
    sched.add(urgent)
    for step in range(3):
        out = sched.schedule()
        scheduled = dict(zip((s.request_id for s in out.seqs), out.num_tokens))
        # Every decode runs each step; the higher-priority prompt's chunk takes what they leave.
        assert scheduled == {"urgent": 5, "s0": 1, "s1": 1, "s2": 1}
        assert step == 0 or out.seqs[0] is urgent  # once running, it leads in priority order
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)


def test_a_step_beside_decodes_takes_the_smaller_decode_budget():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16, decode_token_budget=6)
    first = make_seq(list(range(40)), rid="first")
    sched.add(first)
    assert sched.schedule().num_tokens == [16]  # nothing decodes: a prompt gets the full budget
    first.num_computed_tokens = 16
    short = make_seq([1, 2], rid="short")
    sched.add(short)
    out = sched.schedule()
    assert out.num_tokens == [16]  # still no decode; the short prompt waits behind the budget
    first.num_computed_tokens = 32
    out = sched.schedule()
    assert out.num_tokens == [8, 2]  # first's last chunk, and short is admitted
    for seq, n in zip(out.seqs, out.num_tokens):
        seq.num_computed_tokens += n
        seq.token_ids.append(7)  # both sampled: both decode now
    late = make_seq(list(range(100, 130)), rid="late")
    sched.add(late)
    out = sched.schedule()
    assert dict(zip((s.request_id for s in out.seqs), out.num_tokens)) == {"first": 1, "short": 1, "late": 4}
