"""`rcm bench i2v --config tiny` on the CPU: the GPU benchmark's code path (TI2V-5B- and A14B-shaped
sampling with the first frame given, one rCM iteration of the 5B shape), eager and compiled."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from rcm.bench.common import random_dit, random_dit_on
from rcm.bench.i2v import BenchI2VConfig, bench_i2v
from rcm.models.wan import WAN_CONFIGS

CLI = Path(__file__).resolve().parents[1] / "cli.py"


def test_meta_built_random_dit_equals_the_host_built_one():
    """``random_dit_on`` (meta -> empty -> init_weights) initializes every parameter: the same values as
    ``random_dit`` from the same seed (whose default init is overwritten)."""
    for name in ("wan-tiny-ti2v", "wan-tiny-i2v"):
        a, b = random_dit(WAN_CONFIGS[name], seed=3), random_dit_on(WAN_CONFIGS[name], "cpu", torch.float32, seed=3)
        for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), k


def test_bench_i2v_cli_tiny(tmp_path):
    out = tmp_path / "i2v.json"
    run = subprocess.run([sys.executable, str(CLI), "bench", "i2v", "--config", "tiny", "--num-frames", "5",
                          "--device", "cpu", "--compile-backend", "aot_eager", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "rcm bench i2v (tiny" in run.stdout
    r = json.loads(out.read_text())
    assert "errors" not in r and set(r["parts"]) == {"sample-ti2v", "sample-a14b", "step-ti2v"}
    ti2v, a14b, step = (r["parts"][p] for p in ("sample-ti2v", "sample-a14b", "step-ti2v"))
    assert ti2v["latent"] == [1, 8, 2, 4, 4] and a14b["latent"] == [1, 4, 2, 8, 8]
    for mode in ("eager", "compiled"):
        for part in (ti2v, a14b):
            m = part["modes"][mode]
            assert m["finite"] and len(m["step_seconds"]) == 4 and m["seconds"] >= sum(m["step_seconds"]) * 0.99
        assert ti2v["modes"][mode]["given_frame_max_error"] == 0.0
        assert a14b["modes"][mode]["experts_per_step"] == ["high", "high", "low", "low"]  # boundary 0.9
        s = step["modes"][mode]
        assert set(s["student"]["phases"]) >= {"scm.teacher", "scm.jvp", "scm.backward", "dmd.rollout", "dmd.backward"}
        assert set(s["critic"]["phases"]) >= {"critic.rollout", "critic.forward", "critic.backward"}
        assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in s["first_losses"]["student"].values())
    assert step["optimizer"] == "sgd"
    # compiled blocks compute what eager ones do: the same first losses from the same draws and weights
    for kind in ("student", "critic"):
        for k, v in step["modes"]["eager"]["first_losses"][kind].items():
            assert abs(step["modes"]["compiled"]["first_losses"][kind][k] - v) <= 1e-4 * abs(v), (kind, k)


def test_bench_i2v_step_with_the_recipes_adamw(tmp_path):
    r = bench_i2v(BenchI2VConfig(config="tiny", parts=("step-ti2v",), modes=("eager",), num_frames=5,
                                 optimizer="adamw", device="cpu", out=tmp_path / "adamw.json"))
    step = r["parts"]["step-ti2v"]
    assert step["optimizer"] == "adamw" and step["modes"]["eager"]["student"]["seconds"] > 0
    assert json.loads((tmp_path / "adamw.json").read_text())["parts"]["step-ti2v"]["optimizer"] == "adamw"
