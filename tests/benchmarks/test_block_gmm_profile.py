"""The block-kernel profile reader: spans and per-tile medians from a known trace."""

from benchmarks import block_gmm_profile as prof


def _trace(per_tid):
    """A Mosaic GPU profiler trace (``ts`` = cycles / 1e3) from ``tid -> [(name, b, e)]``."""
    events = []
    for tid, rows in per_tid.items():
        marks = [(b, "B", n) for n, b, e in rows] + [(e, "E", n) for n, b, e in rows]
        for ts, ph, name in sorted(marks, key=lambda m: (m[0], m[1] == "B")):
            events.append({"name": name, "ph": ph, "ts": ts / 1e3, "pid": 1, "tid": tid})
    return {"traceEvents": events}


def test_summary_of_a_two_tile_program():
    consumer = [("tile", 0, 100), ("mainloop", 5, 80), ("epilogue", 80, 95),
                ("tile", 100, 220), ("mainloop", 110, 200), ("epilogue", 200, 215)]  # fmt: skip
    producer = [("tile", 0, 90), ("tile", 100, 190)]
    trace = _trace({1: consumer, 2: consumer, 3: producer})
    assert prof.spans(trace)[3] == [("tile", 0.0, 90.0), ("tile", 100.0, 190.0)]
    s = prof.summarize(trace, k_iters=4, tile_flops=4096 * 10)
    assert s["period"] == 105  # mainloop starts 5 -> 110
    assert s["main"] == 82.5  # medians of 75 and 90
    assert s["epi"] == 15
    assert s["other"] == 105 - 75 - 15
    assert s["prod"] == 90
    assert s["first"] == 75
    assert s["ideal"] == 40
    assert s["tiles_per_sm"] == 2
