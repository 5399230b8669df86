"""On the GPU, the DiT's JVP pass runs through the Triton kernels and matches the pure-torch backend."""

import pytest
import torch

from rcm.kernels import ops
from rcm.models.wan import WanDiT, wan_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-4), (torch.bfloat16, 5e-3)])
def test_dit_jvp_triton_matches_reference(dtype, tol):
    torch.manual_seed(0)
    cfg = wan_config("wan2.1-t2v-1.3b", dim=512, ffn_dim=1024, num_heads=4, num_layers=2)  # head dim 128
    model = WanDiT(cfg).cuda().to(dtype)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    x = torch.randn(1, 16, 3, 30, 52, device="cuda")  # 3·15·26 = 1170 tokens: not a multiple of any block
    t = torch.tensor([700.0], device="cuda")
    c = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda") * 0.1
    dx, dt = torch.randn_like(x), torch.tensor([350.0], device="cuda")
    q = torch.empty(1, 8, 4, 128, device="cuda", dtype=dtype)
    assert ops.resolve_backend(q, q, q) == "triton"
    results = {}
    for backend in ("triton", "reference"):
        ops.set_backend(backend)
        try:
            with torch.no_grad():
                results[backend] = torch.func.jvp(lambda a, b: model(a, b, c), (x, t), (dx, dt))
        finally:
            ops.set_backend(None)
    (o_t, t_t), (o_r, t_r) = results["triton"], results["reference"]
    assert t_r.norm() > 0 and torch.isfinite(t_t).all()
    assert rel(o_t, o_r) < tol and rel(t_t, t_r) < tol, (rel(o_t, o_r), rel(t_t, t_r))
