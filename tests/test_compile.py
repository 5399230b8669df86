"""torch.compile equals eager for a Wan DiT block: forward, gradients and JVP tangents.

A compiled JVP through an autograd.Function with a custom jvp returns an all-zero tangent without error
(docs/design.md fact 3); the tangent checks here would fail on exactly that (they also check the tangent is not
zero). Uses the inductor backend: what users get from torch.compile.
"""

import pytest
import torch

from rcm.models.wan import WanBlock, rope_table


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def block_and_inputs():
    torch.manual_seed(0)
    block = WanBlock(dim=128, ffn_dim=256, num_heads=2)
    with torch.no_grad():
        block.modulation.normal_(0, 0.2)
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 128)
    e = torch.randn(2, 6, 128) * 0.2
    ctx = torch.randn(2, 5, 128)
    rope = rope_table(grid, 64, dtype=torch.float32)
    tangents = (torch.randn_like(x), torch.randn_like(e))
    return block, x, e, ctx, rope, tangents


def test_compiled_block_matches_eager(block_and_inputs):
    torch._dynamo.reset()
    block, x, e, ctx, rope, (tx, te) = block_and_inputs
    params = dict(block.named_parameters())

    def f(params, x, e):
        return torch.func.functional_call(block, params, (x, e, ctx, rope))

    def loss(params, x, e):
        return f(params, x, e).square().mean()

    out_c = torch.compile(f, fullgraph=True)(params, x, e)
    assert rel_err(out_c, f(params, x, e)) < 1e-5

    # gradients the way training takes them: a compiled forward, then .backward()
    g_e = torch.func.grad(loss)(params, x, e)
    block.zero_grad(set_to_none=True)
    torch.compile(loss, fullgraph=True)(params, x, e).backward()
    for name, p in block.named_parameters():
        assert rel_err(p.grad, g_e[name]) < 1e-4, name

    # Tangents: torch.func.jvp *around* a compiled callable must give the right, non-zero tangent rather than
    # the silent zeros of docs/design.md fact 3. (Forward-AD dual tensors fed to a compiled function lose their
    # tangent; compiling torch.func.jvp itself is tested below.)
    compiled = torch.compile(lambda x, e: block(x, e, ctx, rope))
    with torch.no_grad():  # the sCM JVP pass runs under no_grad
        p_e, t_e = torch.func.jvp(lambda x, e: block(x, e, ctx, rope), (x, e), (tx, te))
        p_c, t_c = torch.func.jvp(compiled, (x, e), (tx, te))
    assert t_e.norm() > 1.0 and t_c.norm() > 1.0, "compiled tangent vanished"
    assert rel_err(p_c, p_e) < 1e-5 and rel_err(t_c, t_e) < 1e-4


def test_compiled_jvp_of_the_whole_denoiser_matches_eager():
    """torch.compile of scm_jvp itself (torch.func.jvp over the wrapper and the DiT, fullgraph): Dynamo traces
    the attention op's tangent explicitly, and WanLayerNorm spells LayerNorm out under compile (Dynamo asserts
    inside layer_norm's forward-AD rule). Training keeps the JVP eager around compiled blocks (compile time),
    but the whole-pass compile must stay correct."""
    from rcm.losses import scm_jvp
    from rcm.models.wan import WanDiT, wan_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = WanDiT(wan_config("wan-tiny")).requires_grad_(False)
    with torch.no_grad():
        net.head.head.weight.normal_(0, 0.02)
    x_t = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    ctx, F_teacher = torch.randn(2, 8, 32), torch.randn_like(x_t)
    eager = scm_jvp(net, x_t, t, ctx, F_teacher)
    compiled = torch.compile(scm_jvp, fullgraph=True, backend="aot_eager")(net, x_t, t, ctx, F_teacher)
    assert eager.norm() > 1e-3, "tangent vanished"
    assert rel_err(compiled, eager) < 1e-5


def _saved_activation_bytes(net, args) -> int:
    """Bytes autograd keeps for the backward pass, parameters excluded (a compiled graph saves its weights
    by reference: no extra memory), each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(*args)
    out.square().mean().backward()
    return sum(saved.values())


def test_compiled_blocks_keep_activation_checkpointing():
    """Under torch.compile the functorch interpreter stack reads as non-empty outside any transform; the
    checkpointed forward took that for "inside torch.func" and ran unchecked, so compiled blocks kept every
    activation (the compiled step's 2.2x peak memory on an H200). Checkpointed and compiled must save what
    checkpointed eager saves, far less than without checkpointing."""
    import copy

    from rcm.models.wan import WanDiT, wan_config
    from rcm.parallel import apply_activation_checkpointing, compile_blocks

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = WanDiT(wan_config("wan-tiny"))
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    args = (torch.randn(2, 4, 2, 4, 4), torch.tensor([0.3, 1.2]), torch.randn(2, 8, 32))
    eager = _saved_activation_bytes(checkpointed, args)
    unchecked = _saved_activation_bytes(compile_blocks(copy.deepcopy(plain)), args)
    compiled = _saved_activation_bytes(compile_blocks(copy.deepcopy(checkpointed)), args)
    assert eager > 0 and unchecked > 3 * eager, (eager, unchecked)  # the test can tell the two apart
    assert compiled <= 1.1 * eager, f"compiled blocks saved {compiled:,} B, checkpointed eager {eager:,} B"
