"""Expert offloading, piece by piece: store format and reads, cache, allocation, prefetch thread, options."""

from __future__ import annotations

import itertools
import json
import os
import random
import threading

import pytest
import torch

from moepass.compiler.options import BackendOptions, OptionsError
from moepass.runtime.offload import allocation
from moepass.runtime.offload.cache import LayerCache
from moepass.runtime.offload.options import OffloadOptions, OffloadOptionsError
from moepass.runtime.offload.prefetch import Prefetcher
from moepass.runtime.offload.store import (
    ALIGNMENT,
    BlockWeights,
    ExpertReader,
    ExpertStoreError,
    aligned_buffer,
    expert_views,
    open_store,
    write_store,
)


def _block(path: str, experts: int = 5, hidden: int = 24, inter: int = 20, dtype=torch.float32, bias=True, seed=0):
    """Odd sizes, so expert ranges and tensors need padding."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "w1": torch.randn(experts, 2 * inter, hidden, generator=g).to(dtype),
        "w2": torch.randn(experts, hidden, inter, generator=g).to(dtype),
        "b1": torch.randn(experts, 2 * inter, generator=g).to(dtype) if bias else None,
        "b2": torch.randn(experts, hidden, generator=g).to(dtype) if bias else None,
    }
    return BlockWeights(path, tensors, {n: f"{path}.experts.{n}" for n, t in tensors.items() if t is not None})


@pytest.fixture
def store(tmp_path):
    blocks = [_block("layers.0.mlp"), _block("layers.1.mlp", dtype=torch.bfloat16, bias=False, seed=1)]
    out = tmp_path / "experts"
    manifest = write_store(blocks, out, source="test")
    return out, manifest, blocks


def test_store_files_are_safetensors_with_aligned_expert_ranges(store):
    from safetensors import safe_open

    out, manifest, blocks = store
    assert sorted(os.listdir(out)) == sorted(["manifest.json"] + [b.file for b in manifest.blocks])
    for block, weights in zip(manifest.blocks, blocks):
        assert block.data_offset % ALIGNMENT == 0 and block.stride % ALIGNMENT == 0
        assert (out / block.file).stat().st_size == block.file_size
        with safe_open(str(out / block.file), "pt") as handle:
            names = set(handle.keys())
            assert any(n.startswith("__pad__.") for n in names)  # odd sizes: the gaps are explicit
            for expert in range(block.num_experts):
                for name, tensor in weights.tensors.items():
                    if tensor is None:
                        assert f"{expert}.{name}" not in names
                        continue
                    assert torch.equal(handle.get_tensor(f"{expert}.{name}"), tensor[expert])
            assert handle.metadata()["block"] == block.path
    data = json.loads((out / "manifest.json").read_text())
    assert data["format"] == "moepass-expert-store/1" and [b["path"] for b in data["blocks"]] == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.parametrize("io", ["auto", "drop_cache", "page_cache"])
def test_reads_return_the_written_bytes(store, io):
    out, _, blocks = store
    root, manifest = open_store(out)
    reader = ExpertReader(root, manifest, io=io, verify=True)
    assert reader.io in ("direct", "drop_cache", "page_cache") and (io == "auto" or reader.io == io)
    for block, weights in zip(manifest.blocks, blocks):
        buffer = aligned_buffer(block.stride)
        assert buffer.data_ptr() % ALIGNMENT == 0
        for expert in reversed(range(block.num_experts)):
            assert reader.read(block, expert, buffer) == block.stride
            views = expert_views(block, buffer)
            assert set(views) == {n for n, t in weights.tensors.items() if t is not None}
            for name, view in views.items():
                assert view.dtype == weights.tensors[name].dtype and torch.equal(view, weights.tensors[name][expert])
        stacked = reader.read_stacked(block)
        assert all(torch.equal(stacked[n], weights.tensors[n]) for n in stacked)
    reader.close()


def test_writing_refuses_an_existing_store_and_leaves_nothing_on_failure(store, tmp_path):
    out, _, blocks = store
    with pytest.raises(ExpertStoreError, match="already exists"):
        write_store(blocks, out)
    bad = BlockWeights("x", {"w1": torch.zeros(3, 4, 4, dtype=torch.complex64), "w2": torch.zeros(3, 4, 4)})
    with pytest.raises(ExpertStoreError, match="cannot hold"):
        write_store([blocks[0], bad], tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    again = write_store(blocks[:1], out, overwrite=True)
    assert open_store(out)[1].paths == again.paths == ["layers.0.mlp"]


def test_missing_and_truncated_files_name_the_expert_and_file(store):
    out, manifest, _ = store
    first, second = manifest.blocks
    os.truncate(out / second.file, second.expert_offset(3) + 100)
    with pytest.raises(ExpertStoreError, match=rf"expert 3 of block layers\.1\.mlp: store file .*{second.file} is truncated"):
        open_store(out)
    os.remove(out / first.file)
    with pytest.raises(ExpertStoreError, match=rf"expert 0 of block layers\.0\.mlp: store file .*{first.file} is missing"):
        open_store(out)


def test_a_store_damaged_after_opening_fails_the_load(store):
    out, manifest, _ = store
    root, manifest = open_store(out)
    block = manifest.blocks[0]
    reader = ExpertReader(root, manifest, io="page_cache", verify=True)
    buffer = aligned_buffer(block.stride)
    with open(out / block.file, "r+b") as handle:  # flip one byte of expert 2's w2
        handle.seek(block.expert_offset(2) + block.tensor("w2").offset + 5)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ExpertStoreError, match=rf"expert 2 of block layers\.0\.mlp: store file .*{block.file} is corrupt"):
        reader.read(block, 2, buffer)
    os.truncate(out / block.file, block.expert_offset(4) + 8)
    with pytest.raises(ExpertStoreError, match=rf"expert 4 of block layers\.0\.mlp: store file .*{block.file} is truncated"):
        reader.read(block, 4, buffer)
    reader.read(block, 1, buffer)  # the intact experts still load


class _FlakyReader:
    """Wraps a reader; fails the experts in ``broken`` and counts reads."""

    def __init__(self, reader, broken=()):
        self.reader, self.broken, self.reads = reader, set(broken), []
        self.gate = threading.Event()
        self.gate.set()

    def read(self, block, expert, into):
        self.gate.wait()
        self.reads.append(expert)
        if expert in self.broken:
            into.fill_(0xAB)  # half-written garbage must never be used
            raise ExpertStoreError(f"cannot load expert {expert} of block {block.path}: test failure")
        return self.reader.read(block, expert, into)


@pytest.fixture
def layer(store):
    out, _, blocks = store
    root, manifest = open_store(out)
    reader = _FlakyReader(ExpertReader(root, manifest, io="page_cache"))
    return manifest.blocks[0], reader, blocks[0]


def _use(cache, needed):
    """One call: acquire and release each needed expert in compute order; returns the weights seen."""
    seen = {}
    for expert in cache.begin(needed, tokens=1):
        seen[expert] = {n: v.clone() for n, v in cache.acquire(expert).items()}
        cache.release(expert)
    cache.end()
    return seen


def test_lru_cache_hits_misses_and_eviction(layer):
    block, reader, weights = layer
    cache = LayerCache(block, reader, capacity=2)
    for needed in ([0, 1], [1, 2], [0, 2], [2]):
        seen = _use(cache, needed)
        for expert, views in seen.items():
            assert all(torch.equal(v, weights.tensors[n][expert]) for n, v in views.items())
    # [0,1]: 2 misses; [1,2]: hit 1, miss 2 (evicts 0); [0,2]: hit 2, miss 0 (evicts 1); [2]: hit
    assert reader.reads == [0, 1, 2, 0]
    s = cache.stats
    assert (s.accesses, s.hits, s.misses, s.calls) == (7, 3, 4, 4)
    assert cache.resident() == [0, 2] and s.bytes_read == 4 * block.stride
    assert s.ideal_bytes == 4 * block.expert_nbytes


def test_more_experts_than_slots_use_the_scratch_slot(layer):
    block, reader, weights = layer
    cache = LayerCache(block, reader, capacity=1)
    seen = _use(cache, [0, 1, 2, 3])
    assert sorted(seen) == [0, 1, 2, 3]
    for expert, views in seen.items():
        assert all(torch.equal(v, weights.tensors[n][expert]) for n, v in views.items())
    assert len(cache.resident()) == 1 and cache.stats.misses == 4
    none = LayerCache(block, reader, capacity=0)
    assert sorted(_use(none, [4, 2])) == [2, 4] and none.resident() == []


def test_a_failed_load_leaves_no_stale_expert(layer):
    block, reader, weights = layer
    cache = LayerCache(block, reader, capacity=1)
    _use(cache, [0])
    reader.broken = {3}
    order = cache.begin([3], tokens=1)
    with pytest.raises(ExpertStoreError, match="expert 3"):
        cache.acquire(order[0])
    cache.end()
    assert cache.resident() == []  # expert 0's slot was given to 3, which failed: now empty
    reader.broken = set()
    seen = _use(cache, [3])
    assert torch.equal(seen[3]["w1"], weights.tensors["w1"][3])


def test_a_failed_prefetch_is_raised_on_the_next_call(layer):
    block, reader, _ = layer
    cache = LayerCache(block, reader, capacity=2)
    reader.broken = {1}
    assert cache.offer_prefetch([1]) == [1]
    cache.load_prefetch(1)
    assert cache.resident() == []
    with pytest.raises(ExpertStoreError, match="expert 1"):
        cache.begin([0], tokens=1)
    reader.broken = set()
    assert 0 in _use(cache, [0])


def test_prefetched_experts_are_hits_and_unused_ones_are_counted(layer):
    block, reader, _ = layer
    cache = LayerCache(block, reader, capacity=2)
    prefetcher = Prefetcher("test-prefetch")
    try:
        assert prefetcher.submit(cache, [3, 1, 4]) == 2  # capped at the capacity, most likely first
        prefetcher.drain()
        assert cache.resident() == [1, 3]
        _use(cache, [3, 0])
        s = cache.stats
        assert (s.hits, s.prefetch_hits, s.misses, s.prefetch_loads) == (1, 1, 1, 2)
        assert s.prefetch_wasted == 1 and cache.resident() == [0, 3]  # 1 was evicted unused
        # a prefetch still reading when the call needs it: the call waits, it is not read twice
        reader.gate.clear()
        prefetcher.submit(cache, [2])
        order = cache.begin([2], tokens=1)
        releaser = threading.Timer(0.05, reader.gate.set)
        releaser.start()
        cache.acquire(order[0])
        cache.release(2)
        cache.end()
        releaser.join()
        assert reader.reads.count(2) == 1 and cache.stats.late + cache.stats.misses == 2  # one read, whoever did it
    finally:
        reader.gate.set()
        prefetcher.close()
    assert not prefetcher.alive


def test_queued_prefetches_a_call_does_not_need_are_cancelled(layer):
    block, reader, _ = layer
    cache = LayerCache(block, reader, capacity=3)
    assert cache.offer_prefetch([0, 1]) == [0, 1]
    _use(cache, [1])  # 1 is taken over by the call, 0 dropped
    cache.load_prefetch(0)
    cache.load_prefetch(1)
    assert reader.reads == [1] and cache.stats.prefetch_cancelled == 1 and cache.resident() == [1]


def test_resize_keeps_the_most_recent_experts(layer):
    block, reader, _ = layer
    cache = LayerCache(block, reader, capacity=3)
    for expert in (0, 1, 2):
        _use(cache, [expert])
    cache.resize(2)
    assert cache.capacity == 2 and cache.resident() == [1, 2]
    cache.resize(4)
    assert cache.capacity == 4 and cache.resident() == [1, 2] and cache.stats.slots == 4
    assert cache.stats.resident_bytes == 5 * block.stride  # + the scratch slot


def test_simulated_lru_misses():
    f = frozenset
    trace = [(f({0, 1}), f()), (f({1, 2}), f()), (f({0, 2}), f()), (f({2}), f())]
    # capacity 1: 0,1 miss; 1 hits, 2 misses; 0, 2 miss; 2 hits
    assert [allocation.simulate_misses(trace, c, prefetch=False) for c in range(4)] == [7, 5, 4, 3]
    # a perfect predictor makes every call a hit once the cache holds a call's experts
    predicted = [(needed, needed) for needed, _ in trace]
    assert allocation.simulate_misses(predicted, 2, prefetch=True) == 0
    assert allocation.miss_curve(trace, 3, prefetch=False) == [7, 5, 4, 3]


def test_dp_allocation_is_optimal_and_uses_the_budget():
    rng = random.Random(0)
    for _ in range(30):
        layers, experts = rng.randint(1, 4), rng.randint(1, 5)
        costs = []
        for _ in range(layers):
            curve = sorted((rng.random() * 10 for _ in range(experts + 1)), reverse=True)
            costs.append(curve)
        total = rng.randint(0, layers * experts + 2)
        sizes = allocation.allocate_slots(costs, total)
        assert sum(sizes) <= total and all(0 <= s <= experts for s in sizes)
        assert sum(sizes) == min(total, layers * experts)
        best = min(
            sum(c[s] for c, s in zip(costs, split))
            for split in itertools.product(range(experts + 1), repeat=layers)
            if sum(split) <= total
        )
        assert sum(c[s] for c, s in zip(costs, sizes)) == pytest.approx(best)
    # the layer whose misses cost more gets the slots; equal layers share them evenly
    assert allocation.allocate_slots([[9, 8, 7], [9, 3, 0]], 2) == [0, 2]
    even = allocation.allocate_slots([[5, 4, 3, 2, 1, 0, 0, 0, 0]] * 32, 100)
    assert sum(even) == 100 and max(even) - min(even) <= 1


def test_even_split():
    assert allocation.even_split(7, [8, 8, 8]) == [3, 2, 2]
    assert allocation.even_split(7, [1, 8, 8]) == [1, 3, 3]
    assert allocation.even_split(30, [2, 3]) == [2, 3]
    assert allocation.even_split(0, [4, 4]) == [0, 0]


def test_offload_options():
    parsed = BackendOptions.parse({"offload": {"store": "s/", "cache_gb": 0.5, "prefetch": False}}).offload
    assert parsed == OffloadOptions("s/", cache_bytes=500_000_000, prefetch=False)
    assert BackendOptions.parse({"offload": "s/"}).offload == OffloadOptions("s/")
    # prefetch defaults on without a cache budget, off with one (what the offload benchmark measured)
    assert BackendOptions.parse({"offload": "s/"}).offload.prefetch
    assert not BackendOptions.parse({"offload": {"store": "s/", "cache_gb": 1.0}}).offload.prefetch
    assert BackendOptions.parse({"offload": {"store": "s/", "cache_gb": 1.0, "prefetch": True}}).offload.prefetch
    assert BackendOptions.parse({}).offload is None
    for bad, message in [
        ({"cache_gb": 1}, "needs 'store'"),
        ({"store": "s", "cache": "fifo"}, "unknown offload cache 'fifo'"),
        ({"store": "s", "cache_size": 1}, "unknown offload option"),
        ({"store": "s", "cache_gb": 1, "cache_bytes": 1}, "not both"),
        ({"store": "s", "allocation": [1, -1]}, "allocation"),
        ({"store": "s", "io": "mmap"}, "unknown offload io"),
        ({"store": "s", "prefetch": "yes"}, "True or False"),
    ]:
        with pytest.raises(OptionsError, match=message):
            BackendOptions.parse({"offload": bad})
    with pytest.raises(OptionsError, match="cpu lowering"):
        BackendOptions.parse({"offload": "s/", "lowering": "triton"})
    with pytest.raises(OffloadOptionsError):
        OffloadOptions.parse(3)
