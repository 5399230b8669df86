"""`rcm bench step` / `rcm bench sample` on a tiny Wan DiT on the CPU: FLOP counts, phases, compiled checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rcm.bench.common import forward_flops, phase_flops, random_dit, wan_shape
from rcm.bench.sample import BenchSampleConfig
from rcm.bench.step import BenchStepConfig

CLI = Path(__file__).resolve().parents[1] / "cli.py"


def test_linear_flops_match_the_flop_counter():
    """Every matmul of a real forward counted by torch's FlopCounterMode (attention runs in an opaque op)."""
    shape = wan_shape("wan-tiny", "480p", 9, 64, 96)
    dit = random_dit(shape.config)
    x, t, ctx = torch.randn(shape.latent), torch.full((1,), 500.0), torch.randn(1, 8, 32)
    with FlopCounterMode(display=False) as counter:
        dit(x, t, ctx)
    assert forward_flops(shape)["linear"] == counter.get_total_flops()


def test_wan_1_3b_480p_counts():
    shape = wan_shape("wan2.1-t2v-1.3b", "480p", 81)
    assert shape.latent == (1, 16, 21, 60, 104) and shape.tokens == 32760
    f = forward_flops(shape)
    assert f["self_attention"] == 4 * 30 * 32760**2 * 1536
    phases = phase_flops(shape, rollout_steps=2)
    F = sum(f.values())
    student = sum(v for k, v in phases.items() if not k.startswith("critic"))
    jvp = 2 * f["linear"] + 3 * f["self_attention"] + 2 * f["cross_attention"]
    assert student == pytest.approx(2 * F + jvp + 3 * F + 2 * F + 3 * F + 2 * F)
    assert 2.5 < jvp / F < 3  # attention dominates at 32760 tokens: the JVP is close to 3 forwards


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="num_frames"):
        wan_shape("wan-tiny", "480p", 80)
    with pytest.raises(ValueError, match="height"):
        wan_shape("wan-tiny", "480p", 5, 40, 32)
    with pytest.raises(ValueError, match="rollout_steps"):
        BenchStepConfig(rollout_steps=5)
    with pytest.raises(ValueError, match="student_steps"):
        BenchSampleConfig(student_steps=(8,))


def test_bench_step_cli(tmp_path):
    out = tmp_path / "step.json"
    run = subprocess.run([sys.executable, str(CLI), "bench", "step", "--model", "wan-tiny", "--height", "32",
                          "--width", "32", "--num-frames", "5", "--device", "cpu", "--repeats", "1",
                          "--compile-backend", "aot_eager", "--json-path", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "torch.compile speed-up" in run.stdout
    r = json.loads(out.read_text())
    check = r["modes"]["compiled"]["check"]
    assert check["tangent_norm"] > 0 and check["tangent_rel_err"] < 1e-5 and check["F_rel_err"] < 1e-5
    for mode in ("eager", "compiled"):
        m = r["modes"][mode]
        assert set(m["student"]["phases"]) >= {"scm.teacher", "scm.jvp", "scm.backward", "dmd.rollout",
                                              "dmd.scores", "dmd.backward", "optimizer", "ema"}
        assert set(m["critic"]["phases"]) >= {"critic.rollout", "critic.forward", "critic.backward", "optimizer"}
        assert m["student"]["seconds"] >= sum(v for k, v in m["student"]["phases"].items() if "." in k) * 0.99
        assert m["student"]["mfu"] > 0 and m["jvp_over_forward"] > 0


def test_bench_sample_cli(tmp_path):
    out = tmp_path / "sample.json"
    run = subprocess.run([sys.executable, str(CLI), "bench", "sample", "--model", "wan-tiny", "--height", "32",
                          "--width", "32", "--num-frames", "5", "--device", "cpu", "--teacher-steps", "3",
                          "--modes", "eager", "--no-decode", "--json-path", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    runs = json.loads(out.read_text())["modes"]["eager"]["runs"]
    assert list(runs) == ["student 1 step", "student 2 steps", "student 4 steps", "teacher 3 steps CFG 5"]
    assert runs["teacher 3 steps CFG 5"]["speedup_vs_teacher"] == 1.0
    assert all(r["dit_seconds"] > 0 for r in runs.values())


def test_bench_step_under_torchrun_cp2_matches_one_process(tmp_path):
    """The sharded benchmark (FSDP2 + CP=2 on 2 gloo processes, models built on meta and filled from rank 0)
    starts from the same losses as one process, and compares itself to that run (--compare)."""
    import os

    tiny = ["--model", "wan-tiny", "--height", "32", "--width", "32", "--num-frames", "5", "--device", "cpu",
            "--repeats", "1", "--modes", "eager"]
    one, cp2 = tmp_path / "one.json", tmp_path / "cp2.json"
    run = subprocess.run([sys.executable, str(CLI), "bench", "step", *tiny, "--json-path", str(one)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(CLI), "bench", "step", *tiny, "--parallel.cp", "2", "--compare", str(one),
                          "--json-path", str(cp2)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "scaling efficiency" in run.stdout
    a, b = json.loads(one.read_text()), json.loads(cp2.read_text())
    assert (b["world"], b["cp"]) == (2, 2) and len(b["modes"]["eager"]["peak_gib_per_rank"]) == 2
    for kind in ("student", "critic"):
        ref, got = a["modes"]["eager"]["first_losses"][kind], b["modes"]["eager"]["first_losses"][kind]
        assert ref.keys() == got.keys() and ref
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5), key


def test_compiled_bench_is_refused_under_torchrun(monkeypatch):
    from rcm.bench.step import bench_step

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process only"):
        bench_step(BenchStepConfig(model="wan-tiny", height=32, width=32, num_frames=5, device="cpu"))
