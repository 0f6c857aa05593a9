"""The offloading table of ``moepass.report(compiled)``.

::

    expert offloading: store experts/ (4 blocks × 8 experts, 12.6 MB), reads with direct; cache allocated
    (DP on the first 32 tokens), 2.0 MB budget; prefetch on
    block               slots  cache MB  hit rate  prefetch used/read  read MB/tok  ideal MB/tok  wait ms/tok
    model.layers.0.mlp      3      1.6     41.2%               10/14         0.72          0.66         0.81
    ...
    all blocks             12      6.3     44.0%               38/52         2.80          2.61         3.02

``read`` counts the aligned ranges read from the store (both threads);
``ideal`` the bytes of every needed expert that was not kept from an earlier
use (what a perfect prefetcher would read); ``wait`` the time the compute
thread was blocked on loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moepass.runtime.offload.session import OffloadSession

__all__ = ["offload_table"]


def _per_token(value: float, tokens: int) -> float:
    return value / tokens if tokens else 0.0


def offload_table(session: OffloadSession) -> list[str]:
    """Lines of the per-layer offloading table of ``session``."""
    stats = session.stats()
    manifest = session.manifest
    options = session.options
    budget = f"{options.cache_bytes / 1e6:.1f} MB budget" if options.cache_bytes else "no cache budget"
    experts = sorted({b.num_experts for b in manifest.blocks})
    lines = [
        f"expert offloading: store {session.root} ({len(manifest.blocks)} blocks × "
        f"{'/'.join(map(str, experts))} experts, {manifest.nbytes / 1e6:.1f} MB), reads with {session.reader.io}; "
        f"cache {session.allocation_source}, {budget}; prefetch {'on' if options.prefetch else 'off'}"
        + ("" if not session.closed else " (session closed)")
    ]
    header = ("block", "slots", "cache MB", "hit rate", "prefetch used/read", "read MB/tok", "ideal MB/tok", "wait ms/tok")
    rows = []
    for s in stats:
        rows.append((
            s.path or "<root>",
            str(s.slots),
            f"{s.resident_bytes / 1e6:.1f}",
            f"{100 * s.hit_rate:.1f}%" if s.accesses else "—",
            f"{s.prefetch_hits}/{s.prefetch_loads}",
            f"{_per_token(s.bytes_read, s.tokens) / 1e6:.3f}",
            f"{_per_token(s.ideal_bytes, s.tokens) / 1e6:.3f}",
            f"{1e3 * _per_token(s.load_wait_s, s.tokens):.2f}",
        ))
    tokens = max((s.tokens for s in stats), default=0)
    accesses = sum(s.accesses for s in stats)
    rows.append((
        "all blocks",
        str(sum(s.slots for s in stats)),
        f"{sum(s.resident_bytes for s in stats) / 1e6:.1f}",
        f"{100 * sum(s.hits for s in stats) / accesses:.1f}%" if accesses else "—",
        f"{sum(s.prefetch_hits for s in stats)}/{sum(s.prefetch_loads for s in stats)}",
        f"{_per_token(sum(s.bytes_read for s in stats), tokens) / 1e6:.3f}",
        f"{_per_token(sum(s.ideal_bytes for s in stats), tokens) / 1e6:.3f}",
        f"{1e3 * _per_token(sum(s.load_wait_s for s in stats), tokens):.2f}",
    ))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def fmt(row) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(r) for r in rows)
    return lines
