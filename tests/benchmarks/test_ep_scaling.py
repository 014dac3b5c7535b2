"""Smoke test of benchmarks/ep_scaling.py: the weak-scaling script runs end to end on
simulated CPU devices (2 and 4, tiny model, few steps) in a subprocess, takes the
expert-parallel path (all-to-alls in the compiled step) and its loss check passes.
Mechanics only: CPU times say nothing about GPU speed.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ep_scaling_tiny_runs(tmp_path):
    out = tmp_path / "ep.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "ep_scaling.py"), "--tiny",
        "--devices", "2,4", "--layers", "1", "--every", "1", "--loss_steps", "3",
        "--steps", "2", "--warmup", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.strip().splitlines()
    rows_md = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in rows_md] == ["2", "4"]
    assert table[-1] == rows_md[-1]  # the table is printed last

    rows = json.loads(out.read_text())["rows"]
    assert [r["devices"] for r in rows] == [2, 4]
    assert [r["experts"] for r in rows] == [4, 8]  # 2 experts per device
    assert [r["tokens_per_step"] for r in rows] == [128, 256]  # 2 x 32 tokens per device
    for r in rows:
        assert r["mesh"] == {"expert": r["devices"]}
        assert r["all_to_alls"] > 0 and r["a2a_mib_per_device"] > 0
        assert 0 < r["a2a_share"] and r["step_ms"] > 0 and r["mfu"] > 0
        assert r["loss_ok"], r
        assert r["loss_max_abs_diff"] <= r["loss_tol"] < 1e-2
    assert rows[0]["efficiency"] == 1.0


def test_hlo_all_to_alls_reads_cpu_and_gpu_forms():
    from benchmarks.expert_parallel import hlo_all_to_alls

    hlo = """
  %all-to-all.3 = (bf16[1,64,16]{2,1,0}, bf16[1,64,16]{2,1,0}) all-to-all(bf16[1,64,16]{2,1,0} %a, bf16[1,64,16]{2,1,0} %b), replica_groups={{0,1}}
  %all-to-all-start = ((bf16[2,512,768]{2,1,0}), bf16[2,512,768]{2,1,0}, u32[], u32[]) all-to-all-start(bf16[2,512,768]{2,1,0} %x), replica_groups={{0,1}}
  %all-to-all-done = bf16[2,512,768]{2,1,0} all-to-all-done(((bf16[2,512,768]{2,1,0}), bf16[2,512,768]{2,1,0}, u32[], u32[]) %all-to-all-start)
  ROOT %all-to-all.7 = s32[2,8]{1,0} all-to-all(s32[2,8]{1,0} %c), dimensions={0}
  %all-reduce = f32[4]{0} all-reduce(f32[4]{0} %d)
"""  # noqa: E501
    assert hlo_all_to_alls(hlo) == [("bf16", 2 * 64 * 16), ("bf16", 2 * 512 * 768), ("s32", 16)]
