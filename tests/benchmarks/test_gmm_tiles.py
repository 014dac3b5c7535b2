"""benchmarks/gmm_tiles.py off the GPU: each kind's operands are the grouped matmul it
names (checked against the reference implementation and its dense twin's FLOPs), and the
summary table picks the fastest configuration of each implementation."""

import jax
import numpy as np
import pytest

from benchmarks import gmm_tiles
from modjax.kernels import grouped_matmul as gm


@pytest.mark.parametrize("kind", gmm_tiles.KINDS)
def test_operands_match_the_kind_and_flops(kind):
    t, d, f, e, k = 256, 64, 128, 4, 2
    layout, a, b, dense, flops = gmm_tiles._operands(kind, t, d, f, e, k, jax.random.PRNGKey(0))
    assert flops == 2 * t * k * d * f  # real rows only
    assert 2 * dense[0].shape[0] * dense[0].shape[1] * dense[1].shape[1] == flops
    bs = gmm_tiles.BS
    if kind.startswith("tg"):
        out = gm.tgmm(a, b, layout, block_size=bs, impl="reference")
        widths = {"tg_up": (d, f), "tg_down": (f, d)}[kind]
        assert out.shape == (e, *widths)
    else:
        trans = kind.endswith("_t")
        out = gm.gmm(a, b, layout, block_size=bs, transpose_rhs=trans, impl="reference")
        assert out.shape == (a.shape[0], f if kind in ("up", "up_t") else d)
    used = int(layout.group_start[-1]) * bs
    assert not np.asarray(a[used:]).any()  # padding rows are zero


def test_best_table_takes_the_fastest_of_each_impl():
    rows = [
        {"shape": "s", "kind": "up", "impl": "dense", "tiles": None, "ms": 1.0, "tflops": 700},
        {"shape": "s", "kind": "up", "impl": "pallas", "tiles": {"bk": 64}, "ms": 2, "tflops": 350},
        {"shape": "s", "kind": "up", "impl": "pallas", "tiles": {"bk": 32}, "ms": 1.5,
         "tflops": 466},
        {"shape": "s", "kind": "up", "impl": "mgpu", "tiles": {"block_m": 64}, "error": "smem"},
        {"shape": "s", "kind": "up", "impl": "mgpu", "tiles": {"block_m": 128}, "ms": 1.4,
         "tflops": 500},
    ]  # fmt: skip
    line = gmm_tiles.best_table(rows).splitlines()[-1]
    assert line == "| s | up | 700 | 350 | 466 {'bk': 32} | 500 {'block_m': 128} | - |"


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="--shapes: unknown shape 'tiny'"):
        gmm_tiles.main(["--shapes", "olmoe,tiny"])


def test_where_keeps_matching_block_tilings_and_the_defaults():
    from modjax.kernels import mgpu_block_gmm as bg

    where = gmm_tiles.parse_where("cluster=2,chain=False")
    assert where == {"cluster": 2, "chain": False}
    kept = [c for impl, c in gmm_tiles._candidates("up", ["block"], where) if impl == "block"]
    assert bg.TILES in kept and bg.default_tiles(512) in kept
    defaults = (bg.TILES, bg.default_tiles(512), bg.default_tiles(768))
    others = [c for c in kept if c not in defaults]
    assert others and all(c.cluster == 2 for c in others)
    everything = gmm_tiles._candidates("up", ["block"])
    assert len(everything) > len(kept) + 1  # dense, and the tilings the filter dropped
    with pytest.raises(ValueError, match="--where: 'size=2' is not FIELD=VALUE"):
        gmm_tiles.parse_where("size=2")


def test_where_keeps_the_weight_gradient_default_when_its_tiles_lack_the_field():
    from modjax.kernels import mgpu_block_gmm as bg

    where = gmm_tiles.parse_where("schedule=pingpong")
    kept = [c for impl, c in gmm_tiles._candidates("up", ["block"], where) if impl == "block"]
    pingpong = [c for c in kept if c.schedule == "pingpong"]
    assert bg.PINGPONG_TILES in pingpong and len(pingpong) > 1
    assert set(kept) - set(pingpong) <= {bg.TILES, bg.default_tiles(768)}
    # TTiles has no `schedule`: the weight gradient's sweep keeps its default only
    tg = gmm_tiles._candidates("tg_up", ["block"], where)
    assert [c for impl, c in tg if impl == "block"] == [bg.T_TILES]
