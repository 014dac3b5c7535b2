"""benchmarks/moe_layer.py: the fused-input-projection experiment computes the library's
dropless layer (values and all gradients), so its timings compare like with like."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import moe_layer


def _two_methods(method_a, method_b):
    """``(args, (fwd, grad) of method_a, (fwd, grad) of method_b)`` on one small skewed case."""
    t, d, f, e, k = 96, 32, 48, 4, 2
    key = jax.random.PRNGKey(0)
    x, params = moe_layer.make_inputs(key, t, d, f, e, k, jnp.float32, dense=False)
    logits = moe_layer.make_logits(jax.random.fold_in(key, 1), t, e, skewed=True)
    build = lambda m: moe_layer.build(m, t, k, e, jnp.float32)
    return (x, logits, params), build(method_a), build(method_b)


@pytest.mark.parametrize("impl", ["", ":reference"])
def test_fused_experiment_equals_the_library_path(impl):
    args, (fwd_a, grad_a), (fwd_b, grad_b) = _two_methods(
        "dropless" + impl, "dropless+fused" + impl
    )
    np.testing.assert_allclose(fwd_a(*args), fwd_b(*args), rtol=1e-5, atol=1e-5)
    ga, gb = grad_a(*args), grad_b(*args)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(ga[2]["wi_gate"]).max()) > 0  # the gradients are not trivially 0
    # the library's own function is back in place after the experiment traced
    assert moe_layer.ffn_lib.expert_ffn_blocks is not moe_layer.fused_expert_ffn_blocks


def test_profile_writes_a_trace_that_trace_summary_reads(tmp_path, capsys):
    from benchmarks import trace_summary

    moe_layer.main(["--shape", "64,16,32,4,2", "--dtype", "float32", "--iters", "2",
                    "--methods", "dense,dropless,dropless+scan", "--profile", str(tmp_path),
                    "--hlo", str(tmp_path / "hlo")])  # fmt: skip
    assert "| dropless |" in capsys.readouterr().out
    # --hlo: the optimized fwd+bwd of each method, under a plain file name
    hlo = sorted(p.name for p in (tmp_path / "hlo").iterdir())
    assert hlo == ["custom-dense.txt", "custom-dropless.txt", "custom-dropless_scan.txt"]
    assert "HloModule" in (tmp_path / "hlo" / "custom-dropless.txt").read_text()
    table = trace_summary.main([str(tmp_path / "custom-dropless"), "--steps", "3"])
    assert "busy ms / step" in table and "| `" in table  # ops were found and tabled
    assert (tmp_path / "custom-dense").is_dir()


def test_reference_error_flags_a_wrong_layer():
    t, d, f, e, k = 64, 16, 32, 4, 2
    key = jax.random.PRNGKey(0)
    x, params = moe_layer.make_inputs(key, t, d, f, e, k, jnp.float32, dense=False)
    args = (x, moe_layer.make_logits(jax.random.fold_in(key, 1), t, e, skewed=False), params)
    fwd, _ = moe_layer.build("dropless", t, k, e, jnp.float32)
    assert moe_layer.reference_error(fwd, args, k) < 1e-5
    wrong = lambda *a: fwd(*a) * 1.01  # a 1% error shows as one
    assert moe_layer.reference_error(wrong, args, k) == pytest.approx(0.01, rel=1e-3)


def test_table_reports_the_reference_error_of_dropless_rows(capsys):
    moe_layer.main(["--shape", "64,16,32,4,2", "--dtype", "float32", "--iters", "2",
                    "--methods", "dense,capacity,dropless"])  # fmt: skip
    rows = {r.split("|")[1].strip(): r.split("|")[-2].strip()
            for r in capsys.readouterr().out.splitlines() if r.startswith("| ")}  # fmt: skip
    assert rows["capacity"] == "-" and rows["dense"] == "-"  # may drop: no reference
    assert float(rows["dropless"]) < 1e-5 and float(rows["dropless (skewed 80%->2)"]) < 1e-5


def test_interleaved_table_and_the_grouped_variant(capsys, monkeypatch):
    from benchmarks import moe_interleaved
    from modjax.kernels import xla_expert_ffn

    fused = []
    real = xla_expert_ffn.expert_ffn
    monkeypatch.setattr(
        xla_expert_ffn, "expert_ffn", lambda *a, **k: fused.append(1) or real(*a, **k)
    )
    out = moe_interleaved.main(["--shape", "64,16,32,4,2", "--rounds", "2",
                                "--methods", "dropless@grouped"])  # fmt: skip
    assert not fused  # the grouped variant traced without the fused loop
    rows = [r for r in out.splitlines() if r.startswith("| d")]
    assert [r.split("|")[1].strip() for r in rows] == ["dense", "dropless@grouped"]
    assert rows[0].split("|")[3].strip() == "1.00"  # dense against itself
    moe_interleaved.main(["--shape", "64,16,32,4,2", "--rounds", "1",
                          "--methods", "dropless+grouped"])  # fmt: skip
    assert not fused  # moe_layer's spelling of the same variant
    moe_interleaved.main(["--shape", "64,16,32,4,2", "--rounds", "1", "--methods", "dropless"])
    assert fused  # and the default path takes it (off the GPU)
    with pytest.raises(ValueError, match=r"--shapes: unknown \['cpu-z'\]"):
        moe_interleaved.main(["--shapes", "cpu-a,cpu-z"])


@pytest.mark.parametrize("variant", ["scan", "count"])
def test_layout_variants_trace_their_layout_and_compute_the_same_layer(variant):
    # dropless+scan: the block groups by a while loop; dropless+count: ranks without a
    # sort. Each is in the traced backward too, and the layer is the same function.
    args, (fwd_a, grad_a), (fwd_b, grad_b) = _two_methods(
        "dropless:reference", f"dropless+{variant}:reference"
    )
    hlo_a, hlo_b = (g.lower(*args).as_text() for g in (grad_a, grad_b))
    if variant == "scan":
        assert "while" not in hlo_a and "while" in hlo_b
    else:
        assert "sort" in hlo_a and "sort" not in hlo_b.replace("sorted", "")
    np.testing.assert_allclose(fwd_a(*args), fwd_b(*args), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_a(*args)), jax.tree.leaves(grad_b(*args)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jnp.searchsorted is moe_layer._SEARCHSORTED  # restored after tracing
    assert moe_layer.gm.LAYOUT_RANKS == "auto"


def test_schedule_variants_pick_the_block_gmm_tiles_and_restore_them():
    from modjax.kernels import mgpu_block_gmm as bg

    assert bg.default_tiles(1024) == bg.PINGPONG_TILES  # the default for short contractions
    with moe_layer.VARIANTS["coop"]():
        assert bg.default_tiles(1024).chain  # chained cooperative pipelines, as before
    with moe_layer.VARIANTS["pingpong"]():
        assert bg.default_tiles(2048) == bg.PINGPONG_TILES  # ping-pong at every K...
        assert bg.default_tiles(640) == bg.TILES  # ...its ring allows (10 steps: it does not)
    assert bg.default_tiles(2048) == bg.TILES and bg.SHORT_K_SCHEDULE == "pingpong"


def test_swiglu_variants_switch_the_fused_kernels_and_restore_them():
    gs, ms = moe_layer.gs, moe_layer.ms
    defaults = (gs.FUSE, ms.SWIGLU_BWD_MAX_K, ms.SUM_T)
    assert defaults == (True, 1024, True)
    for name, want in [("unfused", (False, 1024, True)), ("bwdall", (True, 1 << 30, True)),
                       ("bwdnone", (True, 0, True)), ("nosum", (True, 1024, False))]:  # fmt: skip
        with moe_layer.VARIANTS[name]():
            assert (gs.FUSE, ms.SWIGLU_BWD_MAX_K, ms.SUM_T) == want, name
        assert (gs.FUSE, ms.SWIGLU_BWD_MAX_K, ms.SUM_T) == defaults


def test_xlarows_variant_switches_the_row_kernels_off_and_restores_them():
    gm = moe_layer.gm
    assert gm.ROW_KERNELS and not gm.GATHER_KERNELS
    with moe_layer.VARIANTS["xlarows"]():
        assert not gm.ROW_KERNELS
    assert gm.ROW_KERNELS
    with moe_layer.VARIANTS["gathers"]():
        assert gm.GATHER_KERNELS
    assert not gm.GATHER_KERNELS


def test_nocib_variant_keeps_the_ffn_and_the_combine_apart_and_restores_it():
    assert moe_layer.gs.COMBINE_IN_BWD
    with moe_layer.VARIANTS["nocib"]():
        assert not moe_layer.gs.COMBINE_IN_BWD
    assert moe_layer.gs.COMBINE_IN_BWD


def test_scatter1_variant_takes_one_program_per_token_block_and_restores_the_tiles():
    from modjax.kernels import pallas_rows as pr

    before = dict(pr.SCATTER_TILES)
    assert before["split"] > 1
    with moe_layer.VARIANTS["scatter1"]():
        assert pr.SCATTER_TILES == {**before, "split": 1}
    assert pr.SCATTER_TILES == before
