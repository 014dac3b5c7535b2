"""Config loading and locked overrides: unknown keys name the closest ones, wrong types
name key, value and expected type."""

import pytest

from modjax.train.config import apply_override, load_config, parse_overrides, to_kwargs
from modjax.train.main import is_multi_process, main

QUICKSTART = "experiments/moe_char_lm.py:tiny"


def test_load_and_override_types():
    c = load_config(QUICKSTART)
    apply_override(c, "optimizer.learning_rate", "1e-2")
    apply_override(c, "optimizer.learning_rate", "2")  # an int is a fine float
    apply_override(c, "train.num_steps", "7")
    apply_override(c, "train.async_checkpoint", "false")
    apply_override(c, "optimizer.freeze_patterns", "('embed',)")
    apply_override(c, "task.aux_loss_weights", "{'load_balancing': 0.5}")
    assert c.optimizer.learning_rate == 2.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.train.num_steps == 7 and c.train.async_checkpoint is False
    assert to_kwargs(c.optimizer)["freeze_patterns"] == ("embed",)
    assert to_kwargs(c.task)["aux_loss_weights"] == {"load_balancing": 0.5}


def test_unknown_key_names_closest():
    c = load_config(QUICKSTART)
    with pytest.raises(ValueError, match=r"optimizer\.learning_rat'.*optimizer\.learning_rate"):
        apply_override(c, "optimizer.learning_rat", "1.0")
    with pytest.raises(ValueError, match=r"train\.num_steps"):
        apply_override(c, "train.num_step", "3")


def test_wrong_type_names_key_value_type():
    c = load_config(QUICKSTART)
    with pytest.raises(ValueError, match=r"train\.num_steps='ten'.*int"):
        apply_override(c, "train.num_steps", "ten")
    with pytest.raises(ValueError, match=r"train\.plots='maybe'.*bool"):
        apply_override(c, "train.plots", "maybe")
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate='fast'.*float"):
        apply_override(c, "optimizer.learning_rate", "fast")


def test_bad_config_arg_and_file():
    with pytest.raises(ValueError, match="tiny"):
        load_config("experiments/moe_char_lm.py:huge")
    with pytest.raises(ValueError, match="--config"):
        load_config("experiments/nope.py")


def test_parse_overrides():
    flags, over = parse_overrides(
        ["--config", "a.py:tiny", "--workdir=w", "--config.train.num_steps=3", "--config.x", "1"]
    )
    assert flags == {"config": "a.py:tiny", "workdir": "w"}
    assert over == [("train.num_steps", "3"), ("x", "1")]


def test_main_reports_config_errors(capsys, tmp_path):
    rc = main(["--config", QUICKSTART, "--workdir", str(tmp_path), "--config.train.nm_steps=3"])
    assert rc == 2
    assert "train.num_steps" in capsys.readouterr().err
    rc = main(["--config", QUICKSTART, "--workdir", str(tmp_path), "--config.seed=x"])
    assert rc == 2 and "expected a value of type int" in capsys.readouterr().err
    assert main(["--config", QUICKSTART]) == 2


def test_multi_process_detection():
    assert not is_multi_process({})
    assert not is_multi_process({"SLURM_NTASKS": "1"})
    assert is_multi_process({"SLURM_NTASKS": "4"})
    assert is_multi_process({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert is_multi_process({"MODJAX_COORDINATOR": "h:1234"})


@pytest.mark.parametrize(
    "spec",
    [
        "experiments/lora_finetune.py:tiny",
        "experiments/adapter_mixture.py:tiny",
        "experiments/vmoe_fashion_mnist.py:tiny",
    ],
)
def test_experiments_build(spec, tmp_path):
    from modjax.train.main import build

    parts = build(load_config(spec), str(tmp_path), log=lambda s: None)
    counts = parts["param_counts"]
    if "lora" in spec:  # the base is frozen, only the LoRAs train
        assert counts["frozen"] > 10 * counts["default"] > 0
    else:
        assert counts["default"] > 0 and "frozen" not in counts
    assert load_config(spec.replace(":tiny", "")).train.num_steps > 1000
