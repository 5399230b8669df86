"""`rcm bench attention` on the CPU (TRITON_INTERPRET=1, issue 20): each row is labelled by what ran (the
reference backend, not our kernels; no SDPA backend names), a row that cannot run says so, no memory column
reads nan, and an unsupported head dim is refused with the supported ones listed."""

from __future__ import annotations

import pytest
import torch

from rcm import ConfigError
from rcm.bench.attention import BenchAttentionConfig, run_attention_bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run")


def test_rows_name_what_ran(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = run_attention_bench([(1, 2, 32, 64)], include=("ours_jvp", "ours_fwd_bwd", "triton_fwd_bwd",
                                                           "sdpa_fwd_bwd", "matmul"), fresh_cache=False)
    out = capsys.readouterr().out
    methods = [r["method"] for r in rows]
    assert "ours fwd+JVP (reference)" in methods and "ours fwd+bwd (public op, reference)" in methods
    assert not any("fused" in m or m.startswith("SDPA") for m in methods), methods
    assert all(m.endswith(", cpu)") for m in methods if m.startswith("matmul")), methods
    triton_row = next(r for r in rows if "backend='triton'" in r["method"])
    assert triton_row["note"].startswith("not run:") and "tflops" not in triton_row
    for word in ("cudnn", "flash", "nan", "None"):
        assert word not in out, (word, out)


def test_unsupported_head_dim_lists_the_supported_ones():
    with pytest.raises(ConfigError, match=r"head dim 12 .*multiples of 8 from 8 to 256.*64, 128, 256"):
        BenchAttentionConfig(shapes=("1,2,64,12",))


def test_without_cuda_or_interpreter_the_cli_says_so_in_one_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU
    proc = subprocess.run([sys.executable, "-m", "rcm", "bench", "attention"], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rcm: error: rcm bench attention needs a CUDA device") and "Traceback" not in proc.stderr
