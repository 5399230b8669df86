"""Device sweep for the Triton attention kernels: ceilings, variant correctness and timings.

Run on the GPU machine (scripts/device_attention.sh sweep). Writes JSON lines to $OUT/sweep.jsonl
and prints one line per variant: what docs/kernels.md records.
"""
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="sweep-cache-"))
import torch  # noqa: E402
import triton  # noqa: E402

from rcm.bench.attention import _Ref, _inputs  # noqa: E402
from rcm.kernels import triton_attention as ta  # noqa: E402
from rcm.kernels.triton_attention import Cfg  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
BUDGET = float(os.environ.get("SWEEP_BUDGET_S", "500"))
LOG = open(os.path.join(OUT, "sweep.jsonl"), "a")


def rec(**d):
    d["t"] = round(time.time() - T0, 1)
    line = json.dumps(d)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def bench(fn, rep=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def kinfo(name):
    k = ta.LAST.get(name)
    if k is None:
        return {}
    try:
        return dict(regs=k.n_regs, spills=k.n_spills, smem=k.metadata.shared)
    except Exception:
        return {}


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    x = torch.empty(2 * 2**30 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms_c = bench(lambda: y.copy_(x))
    rec(what="ceilings", matmul_tflops=2 * 8192**3 / ms / 1e9, copy_tbs=2 * x.numel() * 2 / ms_c / 1e9,
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    return 2 * 8192**3 / ms / 1e9


_CACHE = {}


def data(shape, dtype=torch.bfloat16):
    key = (shape, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        B, H, L, D = shape
        t = _inputs(B, H, L, D, dtype, torch.device("cuda"))
        _CACHE[key] = (t, _Ref(t, D ** -0.5, n_heads=2, n_rows=128))
    return _CACHE[key]


def variant(kind, cfg, shape, mm, dtype=torch.bfloat16):
    if time.time() - T0 > BUDGET:
        rec(what="skipped (budget)", kind=kind, cfg=list(cfg), shape=shape)
        return None
    t, ref = data(shape, dtype)
    B, H, L, D = shape
    sc = D ** -0.5
    q, k, v, qd, kd, vd, go = (t[n] for n in ("q", "k", "v", "qd", "kd", "vd", "go"))
    ta.OVERRIDE.clear()
    ta.OVERRIDE[kind] = cfg
    try:
        if kind == "jvp":
            fn = lambda: ta.forward_jvp(q, k, v, qd, kd, vd, sc)  # noqa: E731
            flops = 12 * B * H * L * L * D
        elif kind == "fwd":
            fn = lambda: ta._fwd_launch(q, k, v, None, None, None, sc, cfg)  # noqa: E731
            flops = 4 * B * H * L * L * D
        else:
            o, _, lse = ta._fwd_launch(q, k, v, None, None, None, sc, ta._cfg("fwd", q))
            fn = lambda: ta._bwd_triton(go, q, k, v, o, lse, sc)  # noqa: E731
            flops = 10 * B * H * L * L * D
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if kind == "jvp":
            errs = dict(e_out=ref.err("out", r[0]), e_tan=ref.err("out_dot", r[1]), e_lse=ref.err("lse", r[2]))
            info = kinfo("fwd")
        elif kind == "fwd":
            errs = dict(e_out=ref.err("out", r[0]), e_lse=ref.err("lse", r[2]))
            info = kinfo("fwd")
        else:
            errs = dict(e_dq=ref.err("dq", r[0]), e_dk=ref.err("dk", r[1]), e_dv=ref.err("dv", r[2]))
            info = dict(dkdv=kinfo("dkdv"), dq=kinfo("dq"))
        del r
        ms = bench(fn)
        tf = flops / ms / 1e9
        rec(what="variant", kind=kind, cfg=list(cfg), shape=shape, dtype=str(dtype)[6:], ms=round(ms, 3),
            tflops=round(tf, 1), x_mm=round(tf / mm, 3), first_s=round(first, 2),
            **{k_: float(f"{v_:.2e}") for k_, v_ in errs.items()}, **info)
        return tf
    except Exception as e:
        rec(what="variant failed", kind=kind, cfg=list(cfg), shape=shape, err=f"{type(e).__name__}: {e}"[:300])
        return None
    finally:
        ta.OVERRIDE.clear()


def sdpa_checks(shape, mm):
    """LSE convention and timings of the SDPA routes (forward and backward)."""
    t, ref = data(shape)
    B, H, L, D = shape
    sc = D ** -0.5
    q, k, v, go = t["q"], t["k"], t["v"], t["go"]
    o_t, _, lse_t = ta._fwd_launch(q, k, v, None, None, None, sc, ta._cfg("fwd", q))
    for name, fn in (("cudnn", ta._fwd_cudnn), ("flash", ta._fwd_flash)):
        try:
            o, lse = fn(q, k, v, sc)
            torch.cuda.synchronize()
            ms = bench(lambda: fn(q, k, v, sc))
            rec(what="sdpa fwd", route=name, shape=shape, ms=round(ms, 3),
                tflops=round(4 * B * H * L * L * D / ms / 1e9, 1),
                lse_maxdiff_vs_ours=(lse - lse_t).abs().max().item(), e_out=ref.err("out", o),
                e_lse=ref.err("lse", lse), out_stride=list(o.stride()), lse_shape=list(lse.shape))
        except Exception as e:
            rec(what="sdpa fwd failed", route=name, err=f"{type(e).__name__}: {e}"[:300],
                tb=traceback.format_exc()[-600:])
    for name, fn in (("flash", ta._bwd_flash), ("cudnn", ta._bwd_cudnn)):
        try:
            r = fn(go, q, k, v, o_t, lse_t, sc)
            torch.cuda.synchronize()
            errs = dict(e_dq=ref.err("dq", r[0]), e_dk=ref.err("dk", r[1]), e_dv=ref.err("dv", r[2]))
            del r
            ms = bench(lambda: fn(go, q, k, v, o_t, lse_t, sc))
            rec(what="sdpa bwd", route=name, shape=shape, ms=round(ms, 3),
                tflops=round(10 * B * H * L * L * D / ms / 1e9, 1), **errs)
        except Exception as e:
            rec(what="sdpa bwd failed", route=name, err=f"{type(e).__name__}: {e}"[:300],
                tb=traceback.format_exc()[-600:])


def jfa_check(shape, mm):
    try:
        from jvp_flash_attention.jvp_attention import attention as jfa
    except Exception as e:
        rec(what="jvp-flash-attention missing", err=str(e)[:200])
        return
    t, ref = data(shape)
    B, H, L, D = shape
    sc = D ** -0.5
    xs = [t[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "qd", "kd", "vd")]
    from jvp_flash_attention.jvp_attention import JVPAttn
    fn = lambda: torch.func.jvp(lambda a, b, c: JVPAttn.fwd_dual(a, b, c, sm_scale=sc), tuple(xs[:3]), tuple(xs[3:]))  # noqa
    try:
        t0 = time.perf_counter()
        o, od = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        errs = dict(e_out=ref.err("out", o, "bhld"), e_tan=ref.err("out_dot", od, "bhld"))
        ms = bench(fn)
        rec(what="jvp-flash-attention", shape=shape, ms=round(ms, 3), first_s=round(first, 2),
            tflops=round(12 * B * H * L * L * D / ms / 1e9, 1), **errs)
    except Exception as e:
        rec(what="jvp-flash-attention failed", err=f"{type(e).__name__}: {e}"[:300],
            tb=traceback.format_exc()[-800:])


def main(stage):
    mm = ceilings()
    S1, S2, S4 = (2, 24, 4096, 128), (1, 12, 32760, 128), (1, 24, 4096, 64)
    if stage in ("jvp", "all"):
        jvp128 = [Cfg(128, 64, 8, 2, True, True), Cfg(128, 64, 8, 2, True, False),
                  Cfg(128, 64, 8, 3, True, True), Cfg(128, 64, 8, 2, False, True),
                  Cfg(128, 32, 8, 3, True, True), Cfg(64, 64, 4, 3, True, True),
                  Cfg(128, 128, 8, 1, True, True), Cfg(64, 32, 4, 3, True, False)]
        for c in jvp128:
            variant("jvp", c, S1, mm)
        for c in jvp128[:3]:
            variant("jvp", c, S2, mm)
        for c in (Cfg(128, 64, 8, 3, True, True), Cfg(128, 128, 8, 2, True, True), Cfg(64, 64, 4, 3, True, True)):
            variant("jvp", c, S4, mm)
    if stage in ("fwd", "all"):
        for c in (Cfg(128, 128, 8, 2, True, True), Cfg(128, 64, 8, 3, True, True),
                  Cfg(128, 128, 8, 3, True, True), Cfg(128, 64, 4, 3, True, True)):
            variant("fwd", c, S1, mm)
        sdpa_checks(S1, mm)
        for c in (Cfg(64, 128, 8, 2), Cfg(64, 64, 4, 2), Cfg(32, 128, 8, 2), Cfg(64, 128, 8, 3),
                  Cfg(128, 128, 8, 2)):
            variant("bwd", c, S1, mm)
        jfa_check(S1, mm)
    if stage == "jvp2":
        S3 = (1, 12, 4096, 256)
        v128 = [Cfg(128, 64, 8, 2), Cfg(128, 64, 8, 2, early=True), Cfg(128, 64, 8, 2, lazy=False),
                Cfg(128, 64, 8, 2, lazy=False, early=True), Cfg(128, 32, 8, 3), Cfg(128, 64, 8, 1)]
        res = [(variant("jvp", c, S1, mm) or 0, c) for c in v128]
        for _, c in sorted(res, key=lambda x: -x[0])[:2]:
            variant("jvp", c, S2, mm)
        for c in (Cfg(128, 64, 8, 2), Cfg(128, 64, 8, 2, early=True), Cfg(64, 64, 4, 3),
                  Cfg(64, 64, 4, 3, tma=True), Cfg(128, 128, 8, 2), Cfg(64, 128, 4, 2)):
            variant("jvp", c, S4, mm)
        for c in (Cfg(64, 32, 8, 2), Cfg(64, 64, 8, 1), Cfg(64, 32, 4, 2)):
            variant("jvp", c, S3, mm)
        variant("jvp", Cfg(128, 64, 8, 2), S1, mm, torch.float16)
        for c in (Cfg(64, 32, 4, 1), Cfg(32, 32, 4, 2), Cfg(64, 16, 4, 2)):
            variant("jvp", c, (1, 12, 4096, 128), mm, torch.float32)
    if stage == "cudnnbwd":
        t, ref = data(S1)
        q, k, v, go = t["q"], t["k"], t["v"], t["go"]
        o, lse = ta.forward(q, k, v, 128 ** -0.5)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False,
            scale=128 ** -0.5)
        rec(what="cudnn fwd outputs", items=[(type(x).__name__, getattr(x, "shape", x) if not isinstance(x, torch.Tensor) else
                                               (list(x.shape), str(x.dtype), str(x.device), list(x.stride())))
                                              for x in res])
        try:  # exactly the autograd formula's arguments
            r = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                go.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), res[0], res[1],
                res[6], res[7], None, res[2], res[3], res[4], res[5], 0.0, False, scale=128 ** -0.5)
            rec(what="cudnn bwd (own outputs)", e_dq=ref.err("dq", r[0], "bhld"), e_dk=ref.err("dk", r[1], "bhld"),
                strides=[list(x.stride()) for x in r])
        except Exception as e:
            rec(what="cudnn bwd (own outputs) failed", err=str(e)[:400])
        try:
            r = ta._bwd_cudnn(go, q, k, v, o, lse, 128 ** -0.5)
            rec(what="_bwd_cudnn", e_dq=ref.err("dq", r[0]), e_dk=ref.err("dk", r[1]),
                e_dv=ref.err("dv", r[2]), ms=bench(lambda: ta._bwd_cudnn(go, q, k, v, o, lse, 128 ** -0.5)))
        except Exception as e:
            rec(what="_bwd_cudnn failed", err=str(e)[:900])
    if stage == "d256":
        for c in (Cfg(64, 16, 8, 2), Cfg(64, 16, 4, 2), Cfg(64, 32, 8, 1, early=True)):
            variant("jvp", c, (1, 12, 4096, 256), mm)
        for c in (Cfg(32, 32, 4, 2), Cfg(64, 32, 4, 1), Cfg(32, 16, 4, 2)):
            variant("fwd", c, (1, 12, 4096, 128), mm, torch.float32)
    rec(what="done", elapsed=round(time.time() - T0, 1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
