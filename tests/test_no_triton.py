"""The package works without triton (issue 20): a CPU install leaves it out of the base dependencies, so
`import rcm`, the attention op and the digits demo must run with triton unimportable, and only an explicit
request for the Triton backend may fail, with a message that says so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    assert sys.modules.get("triton", 0) is None  # the sitecustomize below blocked it
    import torch
    import rcm, cli
    from rcm.kernels import attention, set_backend

    q, k, v = (torch.randn(1, 8, 2, 64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="reference"))
    out, tangent = torch.func.jvp(lambda q: attention(q, k, v), (q,), (torch.randn_like(q),))
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0
    for ask in (lambda: set_backend("triton"), lambda: attention(q, k, v, backend="triton")):
        try:
            ask()
        except ImportError as e:
            assert "needs the triton package" in str(e), e
        else:
            raise AssertionError("the Triton backend was asked for without triton and nothing said so")

    from rcm.digits.model import build_model, save_model
    save_model(build_model("digits-dit-tiny"), sys.argv[1] + "/teacher.safetensors", {"kind": "teacher"})
    cli.main(["distill", "--teacher", sys.argv[1] + "/teacher.safetensors", "--out-dir", sys.argv[1] + "/run",
              "--no-report", "--loop.iterations", "2", "--batch-size", "2", "--threads", "1"])
    assert "triton" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
    print("ran without triton")
""")


def test_base_dependencies_leave_triton_to_the_test_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["test"])


def test_import_attention_and_distill_without_triton(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None  # `import triton` fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran without triton" in proc.stdout
