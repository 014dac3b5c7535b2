"""modjax's own Mosaic GPU block gmm (``modjax.kernels.mgpu_block_gmm``).

On CPU: both orientations lower for CUDA (one Mosaic GPU kernel each), the cooperative
schedule runs in jax's Mosaic GPU interpreter against the reference (values, zeroed
blocks; the interpreter of jax 0.10 takes neither transposed operands nor the ping-pong
schedule's parity waits), and bad input errors name the argument. With
``MODJAX_GPU_TESTS=1`` on a Hopper GPU: values against the reference implementation in
bf16 with random, skewed and empty groups, and rows of unused blocks zeroed.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.kernels import grouped_matmul as gm
from modjax.kernels import mgpu_block_gmm as bg
from tests.kernels.test_mgpu_gmm import _case as _mgpu_case

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind="random", m=3000, k=512, n=768, g=8):
    """The block-padded rows ``xp`` of a routing ``kind``, its layout and bf16 weights."""
    _, _, src, layout, x, w = _mgpu_case(kind, m=m, k=k, n=n, g=g)
    return layout, jnp.take(x, src, axis=0, mode="fill", fill_value=0), w


#: a ping-pong tiling the CPU case (K = 256: 4 steps) takes: a ring of 2 slots
PINGPONG = bg.PINGPONG_TILES.replace(stages=2)


@pytest.mark.parametrize(
    "tiles",
    [None, bg.TILES, bg.TILES.replace(cluster=2), PINGPONG, PINGPONG.replace(wait=0)],
    ids=["chained", "default", "cluster", "pingpong", "pingpong-wait0"],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_block_gmm_lowers_for_cuda(monkeypatch, transpose, tiles):
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip
    layout, xp, w = _case(m=700, k=256, n=512)
    if transpose:
        w = jnp.swapaxes(w, 1, 2)
    fn = jax.jit(lambda x, w: bg.gmm(x, w, layout.block_group, layout.group_start[-1],
                                     transpose_rhs=transpose, tiles=tiles))  # fmt: skip
    text = fn.trace(xp, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("tiles", [bg.TILES, bg.TILES.replace(chain=True, minor="n")],
                         ids=["default", "chained"])  # fmt: skip
def test_block_gmm_interpreted_on_cpu_matches_reference(kind, tiles):
    # jax's Mosaic GPU interpreter runs the kernel on the host: TMA copies into shared
    # memory, the producer/consumer barriers, wgmma, the epilogue and the zeroed blocks
    layout, xp, w = _case(kind, m=500, k=256, n=256, g=4)
    got = bg.gmm(xp, w, layout.block_group, layout.group_start[-1], tiles=tiles, interpret=True)
    want = gm.gmm(xp, w, layout, block_size=128, impl="reference")
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=1e-2, atol=1e-2)
    used = int(layout.group_start[-1]) * 128
    assert used < got.shape[0] and (np.asarray(got[used:]) == 0).all()


def test_block_gmm_interpret_names_what_the_interpreter_lacks():
    layout, xp, w = _case(m=500, k=256, n=256, g=4)
    g, u = layout.block_group, layout.group_start[-1]
    for kw in (dict(tiles=PINGPONG), dict(transpose_rhs=True), dict(profile_dir="/tmp/p")):
        with pytest.raises(ValueError, match="interpret=True takes the cooperative schedule"):
            bg.gmm(xp, w, g, u, interpret=True, **kw)


def test_short_contractions_take_pingpong_or_chained_pipelines(monkeypatch):
    # short contractions: ping-pong where its ring allows (K/64 a multiple of 2*4 slots)...
    assert bg.default_tiles(512) == bg.default_tiles(1024) == bg.PINGPONG_TILES
    assert bg.default_tiles(768).chain  # 12 steps: chained cooperative pipelines (K=256 too)
    assert bg.default_tiles(2048) == bg.TILES and not bg.TILES.chain
    assert bg.default_tiles(640) == bg.TILES  # 10 steps of 64: not a whole number of 4 stages
    # ... or chained cooperative pipelines where the schedule is switched off
    monkeypatch.setattr(bg, "SHORT_K_SCHEDULE", "cooperative")
    assert bg.default_tiles(512).chain and bg.default_tiles(1024).chain


def test_block_gmm_errors_name_the_problem():
    layout, xp, w = _case(m=700, k=256, n=512)
    g, u = layout.block_group, layout.group_start[-1]
    with pytest.raises(ValueError, match="needs block_size=128, got 64"):
        bg.gmm(xp, w, g, u, block_size=64)
    with pytest.raises(ValueError, match="bfloat16 or float16 operands; x is float32"):
        bg.gmm(xp.astype(jnp.float32), w.astype(jnp.float32), g, u)
    with pytest.raises(ValueError, match=r"K \(x width\)=200 must be a multiple of the tile "):
        bg.gmm(xp[:, :200], w[:, :200], g, u)
    with pytest.raises(ValueError, match=r"N \(output width\)=384 must be a multiple of the tile "
                                         r"2\*tile_n\*cluster=256"):  # fmt: skip
        bg.gmm(xp, w[:, :, :384], g, u)
    with pytest.raises(ValueError, match=r"N \(output width\)=768 must be a multiple of the tile "
                                         r"2\*tile_n\*cluster=512"):  # fmt: skip
        bg.gmm(xp, jnp.concatenate([w, w[:, :, :256]], axis=2), g, u, tiles=bg.Tiles(cluster=2))
    with pytest.raises(ValueError, match="tiles.cluster must be 1 or 2 .2 with chain=False., "
                                         "got cluster=2 chain=True"):  # fmt: skip
        bg.gmm(xp, w, g, u, tiles=bg.Tiles(cluster=2, chain=True))
    with pytest.raises(ValueError, match="got cluster=4"):
        bg.gmm(xp, w, g, u, tiles=bg.Tiles(cluster=4))
    with pytest.raises(ValueError, match="tiles.chain needs K/tile_k = 4 divisible by stages=3"):
        bg.gmm(xp, w, g, u, tiles=bg.Tiles(chain=True, stages=3))
    with pytest.raises(ValueError, match="tiles.minor must be 'n' or 'm', got 'k'"):
        bg.gmm(xp, w, g, u, tiles=bg.Tiles(minor="k"))


def test_pingpong_errors_name_the_problem():
    layout, xp, w = _case(m=700, k=256, n=512)
    g, u = layout.block_group, layout.group_start[-1]
    with pytest.raises(ValueError, match="tiles.schedule must be 'cooperative' or 'pingpong', "
                                         "got 'pong'"):  # fmt: skip
        bg.gmm(xp, w, g, u, tiles=bg.Tiles(schedule="pong"))
    with pytest.raises(ValueError, match="'pingpong' needs cluster=1 and wait 0 or 1, got "
                                         "cluster=2 wait=1"):  # fmt: skip
        bg.gmm(xp, w, g, u, tiles=PINGPONG.replace(cluster=2))
    with pytest.raises(ValueError, match="got cluster=1 wait=2"):
        bg.gmm(xp, w, g, u, tiles=PINGPONG.replace(wait=2))
    with pytest.raises(ValueError, match=r"N \(output width\)=320 must be a multiple of the tile "
                                         r"tile_n=128"):  # fmt: skip
        bg.gmm(xp, w[:, :, :320], g, u, tiles=PINGPONG)
    with pytest.raises(ValueError, match=r"'pingpong' needs K/tile_k = 4 a multiple of "
                                         r"2\*stages = 8"):  # fmt: skip
        bg.gmm(xp, w, g, u, tiles=bg.PINGPONG_TILES)
    wide = PINGPONG.replace(stages=4, tile_k=128)
    with pytest.raises(ValueError, match="tile_k=128 stages=4 needs 294912 bytes of shared "):
        bg.gmm(jnp.concatenate([xp] * 8, axis=1), jnp.concatenate([w] * 8, axis=1), g, u,
               tiles=wide)  # fmt: skip
    with pytest.raises(ValueError, match="profile_dir is for the cooperative schedule only"):
        bg.gmm(xp, w, g, u, tiles=PINGPONG, profile_dir="/tmp/x")
    # N = 384 is whole ping-pong tiles (128) though not whole cooperative ones (256)
    assert bg.fits(256, 384, PINGPONG) and not bg.fits(256, 384)
    assert bg.pingpong_smem(bg.PINGPONG_TILES, jnp.bfloat16) <= bg.SMEM_BYTES


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "tiles",
    [
        bg.TILES,
        bg.Tiles(tile_n=64, stages=3, minor="n", band=4),
        bg.TILES.replace(wait=1, epi=128, stages=3),
        bg.TILES.replace(chain=True),
        bg.PINGPONG_TILES,
        bg.PINGPONG_TILES.replace(wait=0, minor="n", band=4),
        bg.PINGPONG_TILES.replace(tile_n=64, stages=2),
    ],
    ids=["default", "n64", "wait1", "chain", "pingpong", "pingpong-wait0", "pingpong-n64"],
)
def test_block_gmm_matches_reference_on_gpu(kind, transpose, tiles):
    layout, out = _matches_reference(_case(kind), transpose, tiles)
    used = int(layout.group_start[-1]) * 128
    assert used < out.shape[0] and (out[used:] == 0).all()  # padding blocks: never computed


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("transpose", [False, True])
def test_block_gmm_in_clusters_matches_reference_on_gpu(kind, transpose):
    tiles = bg.TILES.replace(cluster=2)  # x tiles multicast to the cluster's two CTAs
    layout, out = _matches_reference(_case(kind, n=1024), transpose, tiles)
    used = int(layout.group_start[-1]) * 128
    assert (out[used:] == 0).all()


def _matches_reference(case, transpose, tiles):
    """The kernel's output against the reference grouped matmul (bf16 tolerances)."""
    layout, xp, w = case
    if transpose:
        w = jnp.swapaxes(w, 1, 2)
    got = bg.gmm(xp, w, layout.block_group, layout.group_start[-1], transpose_rhs=transpose,
                 tiles=tiles)  # fmt: skip
    want = gm.gmm(xp, w, layout, block_size=128, transpose_rhs=transpose, impl="reference")
    a, b = np.float32(got), np.float32(want)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
    np.testing.assert_allclose(a, b, atol=5e-2, rtol=2e-2)
    return layout, a


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m", [20000, 3000])  # ~3.6 output tiles per SM of 132; <= 1
def test_block_gmm_chained_pipelines_on_gpu(transpose, m):
    _matches_reference(_case("skewed", m=m), transpose, bg.TILES.replace(chain=True))


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m,n", [(20000, 384), (3000, 640), (300, 128)])
def test_block_gmm_pingpong_tile_counts_on_gpu(transpose, m, n):
    """Many tiles per SM, an odd number of column tiles, fewer tiles than SMs (one
    consumer idle): the consumers' turns and ring phases stay in step."""
    layout, out = _matches_reference(_case("skewed", m=m, n=n), transpose, bg.PINGPONG_TILES)
    assert (out[int(layout.group_start[-1]) * 128 :] == 0).all()


def test_block_tgmm_lowers_for_cuda_and_names_bad_input(monkeypatch):
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip
    layout, xp, _ = _case(m=700, k=256, n=512)
    dy = jnp.ones((xp.shape[0], 512), xp.dtype)
    fn = jax.jit(lambda x, dy: bg.tgmm(x, dy, layout.group_start))
    text = fn.trace(xp, dy).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert fn.eval_shape(xp, dy).shape == (layout.group_start.shape[0] - 1, 256, 512)
    with pytest.raises(ValueError, match="needs block_size=128, got 64"):
        bg.tgmm(xp, dy, layout.group_start, block_size=64)
    with pytest.raises(ValueError, match="same rows"):
        bg.tgmm(xp, dy[:-128], layout.group_start)
    with pytest.raises(ValueError, match=r"N \(dy width\)=384 must be a multiple"):
        bg.tgmm(xp, dy[:, :384], layout.group_start)
    with pytest.raises(ValueError, match="float16 operands; x is float32"):
        bg.tgmm(xp.astype(jnp.float32), dy.astype(jnp.float32), layout.group_start)
    with pytest.raises(ValueError, match="out_dtype must be float32, bfloat16 or float16"):
        bg.tgmm(xp, dy, layout.group_start, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match="tiles.tile_r must be 64 or 128, got 32"):
        bg.tgmm(xp, dy, layout.group_start, tiles=bg.TTiles(tile_r=32))
    wide = bg.TTiles(tile_n=64, tile_r=128, stages=2)
    other = jax.jit(
        lambda x, dy: bg.tgmm(x, dy, layout.group_start, tiles=wide, out_dtype=jnp.bfloat16)
    )
    assert "mosaic_gpu" in other.trace(xp, dy).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("tiles", [bg.T_TILES, bg.TTiles(tile_n=64, tile_r=128, stages=2, band=2)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_block_tgmm_matches_reference_on_gpu(kind, tiles, out_dtype):
    layout, xp, _ = _case(kind)
    dy = jax.random.normal(jax.random.PRNGKey(3), (xp.shape[0], 512), jnp.float32)
    live = jnp.arange(xp.shape[0])[:, None] < layout.group_start[-1] * 128
    dy = jnp.where(live, dy, 0).astype(xp.dtype)  # the layout's padding rows are zero
    got = bg.tgmm(xp, dy, layout.group_start, tiles=tiles, out_dtype=out_dtype)
    want = gm.tgmm(xp, dy, layout, block_size=128, impl="reference")
    assert got.dtype == out_dtype and got.shape == want.shape
    a, b = np.asarray(got), np.float32(want)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
    np.testing.assert_allclose(a, b, atol=5e-2, rtol=2e-2)
    empty = np.asarray(layout.group_start[1:] == layout.group_start[:-1])
    assert (a[empty] == 0).all()  # an empty group's gradient is written as zeros
