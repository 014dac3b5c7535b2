"""Mesh layout table of parameters and activations."""

import jax.numpy as jnp
import pytest
from flax import nnx

from modjax.parallel.layout import format_layout, print_layout
from modjax.sharding import make_mesh


class _TinyMoE(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.router = nnx.Param(jnp.zeros((8, 8)), logical_axes=("embed", None))
        self.wi = nnx.Param(
            jnp.zeros((8, 8, 6), jnp.bfloat16), logical_axes=("expert", "embed", "expert_mlp")
        )
        self.odd = nnx.Param(jnp.zeros((6, 3)), logical_axes=("expert", None))
        self.plain = nnx.Linear(8, 3, rngs=rngs)


def _row(table: str, name: str) -> list[str]:
    for line in table.splitlines():
        if line.split() and line.split()[0] == name:
            return line.split("  ")
    raise AssertionError(f"no row {name!r} in\n{table}")


def _cells(table, name):
    return [c.strip() for c in _row(table, name) if c.strip()]


def test_parameter_specs_shards_and_bytes():
    table = format_layout(_TinyMoE(nnx.Rngs(0)), make_mesh(data=2, fsdp=2, expert=2))
    assert table.splitlines()[0] == "mesh data=2 x fsdp=2 x expert=2 x tensor=1"
    assert _cells(table, "wi") == [
        "wi", "Param", "[8, 8, 6]", "bfloat16", "(expert, embed, expert_mlp)",
        "P(expert, fsdp, -)", "[4, 4, 6]", "192",
    ]  # fmt: skip
    assert _cells(table, "router")[5:] == ["P(fsdp, -)", "[4, 8]", "128"]
    assert _cells(table, "plain/kernel")[4:] == ["-", "P()", "[8, 3]", "96"]
    # 6 experts over expert=2 divide; over expert=4 they do not: flagged with "!".
    assert _cells(table, "odd")[6] == "[3, 3]"
    table4 = format_layout(_TinyMoE(nnx.Rngs(0)), make_mesh(data=2, expert=4))
    assert _cells(table4, "odd")[6] == "[2!, 3]"
    # 256 + 768 + 72 + 96 + 12 in all; 128 + 192 + 36 + 96 + 12 per device
    assert "parameters: 5 arrays, 1,204 bytes in all, 464 bytes per device" in table
    assert "moe tokens [T, D]" in table and "P((data,fsdp,expert), -)" in table


def test_state_and_abstract_state_and_custom_activations(capsys):
    mesh = make_mesh(expert=8)
    abstract = nnx.state(nnx.eval_shape(lambda: _TinyMoE(nnx.Rngs(0))))
    table = format_layout(abstract, mesh, activations={"x [T, D]": ("batch", None)})
    assert _cells(table, "wi")[5:] == ["P(expert, -, -)", "[1, 8, 6]", "96"]
    assert _cells(table, "x")[-1] == "P(expert, -)"
    print_layout(abstract, mesh)
    assert "P(expert, -, -)" in capsys.readouterr().out


def test_bad_inputs():
    mesh = make_mesh(expert=8)
    with pytest.raises(TypeError, match="model_or_state"):
        format_layout({"w": jnp.zeros(3)}, mesh)
    with pytest.raises(TypeError, match="mesh"):
        format_layout(_TinyMoE(nnx.Rngs(0)), {"expert": 8})

    class Bad(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((2, 3)), logical_axes=("embed",))

    with pytest.raises(ValueError, match="logical_axes"):
        format_layout(Bad(), mesh)

    class Unknown(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((2,)), logical_axes=("nonsense",))

    with pytest.raises(ValueError, match="nonsense"):
        format_layout(Unknown(), mesh)


def test_rng_keys_and_real_moe_layer():
    from modjax.layers.moe import MoE

    moe = MoE(16, num_experts=8, d_ff=32, k=2, rngs=nnx.Rngs(0))

    class WithRngs(nnx.Module):
        def __init__(self):
            self.rngs = nnx.Rngs(0)

    table = format_layout(WithRngs(), make_mesh(expert=8))
    assert _cells(table, "rngs/default/key")[3:] == ["key<fry>", "-", "P()", "[]", "8"]
    table = format_layout(moe, make_mesh(data=2, expert=4))
    assert _cells(table, "wo")[1:6] == [
        "ExpertParam", "[8, 32, 16]", "float32", "(expert, expert_mlp, embed)", "P(expert, -, -)"
    ]  # fmt: skip
