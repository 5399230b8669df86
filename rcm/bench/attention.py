"""`rcm bench attention`: the public attention op against PyTorch's SDPA and a matmul, one process.

Per shape (random normal bf16 inputs, layout [B, L, H, D]) it times, with the median of
`triton.testing.do_bench`:
  * the fused forward+JVP: `torch.func.jvp(rcm.kernels.attention, ...)` under no_grad, counted as
    12·B·H·L²·D FLOP (six matmuls);
  * forward+backward through the public op (`attention(q, k, v)` then `torch.autograd.grad`) and the
    same with `backend='triton'` (our backward kernels), counted as 14·B·H·L²·D (two + five matmuls);
  * SDPA forward+backward on each fast backend (cuDNN, flash, efficient) on the same [B, L, H, D]
    views; "SDPA best" is the fastest of them;
  * optionally torch.func.jvp through SDPA-math and the jvp-flash-attention package.
It reports TFLOP/s, the ratio to a bf16 8192³ matmul timed in the same process (`matmul_tflops`),
MFU against the datasheet peak (989 TFLOP/s dense bf16, H100/H200 SXM), peak extra memory, the first
call's wall time (compile included) and the relative L2 error against a float64 reference on a sample
of heads, query rows and key rows (full fp64 attention at L=32760 would not fit).
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from typing import Callable, Iterable, Optional

import torch

from rcm.bench.config import ALL, DEFAULT_INCLUDE, DEFAULT_SHAPES, BenchAttentionConfig

DATASHEET_BF16_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- float64 reference on a sample -------------------------------------------------------------


class _Ref:
    """fp64 attention, tangent and gradients for sampled heads / query rows / key rows."""

    def __init__(self, t: dict, scale: float, n_heads=3, n_rows=256, seed=0):
        B, L, H, D = t["q"].shape
        g = torch.Generator().manual_seed(seed)
        self.heads = [(int(b), int(h)) for b, h in zip(torch.randint(0, B, (n_heads,), generator=g),
                                                       torch.randperm(H, generator=g)[:n_heads])]
        self.rows = torch.randperm(L, generator=g)[: min(n_rows, L)].sort().values.to(t["q"].device)
        Lk = t["k"].shape[1]
        self.cols = torch.randperm(Lk, generator=g)[: min(n_rows, Lk)].sort().values.to(t["q"].device)
        self.scale = scale
        self.ref = [self._one(t, b, h) for b, h in self.heads]

    def _one(self, t, b, h):
        f = lambda name: t[name][b, :, h].double()  # noqa: E731
        q, k, v, qd, kd, vd, go = (f(n) for n in ("q", "k", "v", "qd", "kd", "vd", "go"))
        tau = self.scale
        # all-row lse, O (for delta) in chunks: needed by dK, dV of the sampled keys
        lse_all, o_all = [], []
        for i in range(0, q.shape[0], 2048):
            s = tau * q[i:i + 2048] @ k.T
            lse = torch.logsumexp(s, -1)
            lse_all.append(lse)
            o_all.append(torch.exp(s - lse[:, None]) @ v)
        lse_all, o_all = torch.cat(lse_all), torch.cat(o_all)
        delta = (go * o_all).sum(-1)
        r = self.rows
        s = tau * q[r] @ k.T
        p = torch.exp(s - lse_all[r, None])
        sd = tau * (qd[r] @ k.T + q[r] @ kd.T)
        hh = p * sd
        o = p @ v
        od = hh @ v - hh.sum(-1, keepdim=True) * o + p @ vd
        dp = go[r] @ v.T
        dq = tau * (p * (dp - delta[r, None])) @ k
        c = self.cols
        pc = torch.exp(tau * q @ k[c].T - lse_all[:, None])  # [L, |c|]
        dv = pc.T @ go
        dk = tau * (pc * (go @ v[c].T - delta[:, None])).T @ q
        return dict(out=o, out_dot=od, lse=lse_all[r], dq=dq, dk=dk, dv=dv)

    def err(self, name: str, x: torch.Tensor, layout="blhd") -> float:
        """relative L2 error of a full [B, L, H, D] (or [B, H, L, D] / lse [B, H, L]) result."""
        num = den = 0.0
        for (b, h), ref in zip(self.heads, self.ref):
            if name == "lse":
                y = x[b, h][self.rows]
            else:
                xs = x[b, :, h] if layout == "blhd" else x[b, h]
                y = xs[self.cols] if name in ("dk", "dv") else xs[self.rows]
            num += (y.double() - ref[name]).pow(2).sum().item()
            den += ref[name].pow(2).sum().item()
        return math.sqrt(num / den) if den > 0 else float("nan")


# ---- timing ------------------------------------------------------------------------------------


def _bench(fn: Callable, budget_ms=400):
    if not torch.cuda.is_available():  # CPU smoke runs (interpreter): wall clock, 3 calls
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=min(100, budget_ms // 4), rep=budget_ms,
                                   return_mode="median")


def _measure(fn: Callable):
    """first-call seconds, peak extra bytes, result of one call."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, None, res  # no peak memory on the CPU: the column stays empty
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    res = fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    return first, peak, res


def matmul_tflops(device: torch.device, n: int = 8192, budget_ms: int = 1200) -> float:
    """TFLOP/s of n³ bf16 matmuls on ``device``: the chip's practical ceiling, for ratios and MFU.

    On CUDA: rounds of 3 warm-up products and then 20 back-to-back products timed between two CUDA
    events, with a short idle gap before each round, until the budget is spent; the best round counts.
    Why so: timing single products with a cache flush between them (triton's do_bench) read ~15% low
    on an H200, and a second of sustained products runs into the card's power limit (seen: 685-705
    TFLOP/s) where short bursts read 770-800. Inputs are random normal: zeros run faster than real data.
    On the CPU: the wall clock of a few products.
    """
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n**3
    if device.type != "cuda":
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * flops / (time.perf_counter() - t0) / 1e12
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_ms, t_end, rounds = float("inf"), time.perf_counter() + budget_ms / 1e3, 0
    while rounds < 3 or time.perf_counter() < t_end:
        torch.cuda.synchronize()
        time.sleep(0.05)  # idle gap: the round starts below the power limit
        for _ in range(3):
            a @ b
        start.record()
        for _ in range(20):
            a @ b
        stop.record()
        stop.synchronize()
        best_ms, rounds = min(best_ms, start.elapsed_time(stop) / 20), rounds + 1
    return flops / best_ms / 1e9


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _inputs(B, H, L, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda: torch.randn((B, L, H, D), generator=g, device=device, dtype=dtype)  # noqa: E731
    return dict(q=mk(), k=mk(), v=mk(), qd=mk(), kd=mk(), vd=mk(), go=mk())


def _jvp_flash_attention():
    """The package's entry for torch.func.jvp (its README: JVPAttn.fwd_dual; plain `attention`
    fails under torch.func.jvp on torch 2.11 with an internal assert)."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn  # type: ignore
        return JVPAttn.fwd_dual
    except Exception as e:  # absent or broken: the row says so
        return e


def _fwd_bwd(forward: Callable, q, k, v, go, layout="blhd"):
    """A callable doing forward + backward of `forward` on fresh leaves; returns (out, dq, dk, dv)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def step():
        out = forward(*leaves)
        grads = torch.autograd.grad(out, leaves, go if layout == "blhd" else go.transpose(1, 2))
        return (out, *grads)

    return step


def run_attention_bench(shapes: Optional[Iterable] = None, dtype: str = "bf16",
                        include: Iterable[str] = DEFAULT_INCLUDE, out_json: Optional[str] = None,
                        fresh_cache: bool = True, budget_ms: int = 400,
                        math_jvp_max_gib: float = 40.0) -> list[dict]:
    """Time the attention paths; print the table and the per-shape summary; return one dict per row."""
    if fresh_cache and "TRITON_CACHE_DIR" not in os.environ:
        import tempfile
        # first-call figures must include compilation: start from an empty Triton cache
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rcm-triton-cache-")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rcm.kernels import attention, select_route
    from rcm.kernels.ops import _triton_usable

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("rcm bench attention needs a CUDA device (or TRITON_INTERPRET=1 for a "
                         "smoke run on tiny shapes)")  # the CLI's one-line error, exit status 2
    include = set(include)
    unknown = include - set(ALL)
    if unknown:
        raise ValueError(f"include: unknown rows {sorted(unknown)}; choose from {ALL}")
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    dt = _DT[dtype]
    dev = torch.device("cuda" if cuda else "cpu")
    n_mm = 8192 if cuda else 256
    rows: list[dict] = []
    mm = dict(tflops=None)

    def matmul_row(when):
        tflops = matmul_tflops(dev, n_mm, 3 * budget_ms)
        rows.append(dict(method=f"matmul bf16 {n_mm}^3 ({when}{'' if cuda else ', cpu'})", shape=f"{n_mm}^3",
                         ms=2 * n_mm**3 / tflops / 1e9, tflops=tflops))
        mm["tflops"] = max(mm["tflops"] or 0.0, tflops)

    if "matmul" in include:
        matmul_row("start")
    jfa = _jvp_flash_attention() if "jvp_flash_attention" in include else None

    for (B, H, L, D) in shapes:
        t = _inputs(B, H, L, D, dt, dev)
        scale = D ** -0.5
        shape = f"{B}x{H}x{L}x{D}"
        ref = _Ref(t, scale)
        q, k, v, qd, kd, vd, go = (t[n] for n in ("q", "k", "v", "qd", "kd", "vd", "go"))
        fl_jvp, fl_fb = (c * B * H * L * L * D for c in (12, 14))
        o_bytes = _nbytes(q)

        def row(method, fn, flops, errs, out_bytes, note=""):
            try:
                first, peak, res = _measure(fn)
                e = errs(res)
                del res
                ms = _bench(fn, budget_ms)
                r = dict(method=method, shape=shape, ms=ms, tflops=flops / ms / 1e9, first_call_s=first,
                         peak_extra_gib=None if peak is None else peak / 2**30,
                         peak_over_outputs=None if peak is None else peak / out_bytes, note=note, **e)
            except torch.OutOfMemoryError:
                r = dict(method=method, shape=shape, note="out of memory")
            except Exception as ex:  # one broken alternative must not hide the others
                r = dict(method=method, shape=shape, note=f"failed: {type(ex).__name__}: {ex}"[:160])
            rows.append(r)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return r

        def jvp_errs(r, lay="blhd"):
            return dict(err_out=ref.err("out", r[0], lay), err_tangent=ref.err("out_dot", r[1], lay))

        def grad_errs(r, lay="blhd"):
            return dict(err_out=ref.err("out", r[0], lay), err_dq=ref.err("dq", r[1], lay),
                        err_dk=ref.err("dk", r[2], lay), err_dv=ref.err("dv", r[3], lay))

        # label each row by the route that runs it (on the CPU: the reference backend, not our kernels)
        jvp_route, public_route = (select_route(q, k, v, has_tangent=h) for h in (True, False))
        if "ours_jvp" in include:
            def ours_jvp():
                with torch.no_grad():
                    return torch.func.jvp(attention, (q, k, v), (qd, kd, vd))
            row("ours fused fwd+JVP" if jvp_route == "triton" else f"ours fwd+JVP ({jvp_route})", ours_jvp,
                fl_jvp, jvp_errs, 2 * o_bytes)
        if "jvp_flash_attention" in include:
            if isinstance(jfa, Exception):
                rows.append(dict(method="jvp-flash-attention", shape=shape,
                                 note=f"not installed ({type(jfa).__name__})"))
            else:
                hs = [x.transpose(1, 2).contiguous() for x in (q, k, v, qd, kd, vd)]
                row("jvp-flash-attention",
                    lambda: torch.func.jvp(lambda a, b_, c: jfa(a, b_, c, sm_scale=scale), tuple(hs[:3]),
                                           tuple(hs[3:])),
                    fl_jvp, lambda r: jvp_errs(r, "bhld"), 2 * o_bytes, note="inputs pre-made [B,H,L,D]")
                del hs
        if "sdpa_math_jvp" in include:
            est = 4 * B * H * L * L * 4 / 2**30  # several fp32 L x L buffers
            if est > math_jvp_max_gib:
                rows.append(dict(method="torch.func.jvp(SDPA math)", shape=shape,
                                 note=f"skipped: needs > {est:.0f} GiB (L x L buffers)"))
            else:
                def math_jvp():
                    with sdpa_kernel(SDPBackend.MATH):
                        return torch.func.jvp(
                            lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, scale=scale),
                            tuple(x.transpose(1, 2) for x in (q, k, v)),
                            tuple(x.transpose(1, 2) for x in (qd, kd, vd)))
                row("torch.func.jvp(SDPA math)", math_jvp, fl_jvp, lambda r: jvp_errs(r, "bhld"), 2 * o_bytes)
        if "ours_fwd_bwd" in include:
            row("ours fwd+bwd (public op)" if cuda else f"ours fwd+bwd (public op, {public_route})", _fwd_bwd(lambda a, b_, c: attention(a, b_, c), q, k, v, go),
                fl_fb, grad_errs, 4 * o_bytes)
        triton_unusable = _triton_usable(q, k, v)
        if "triton_fwd_bwd" in include and triton_unusable:
            rows.append(dict(method="ours fwd+bwd (backend='triton')", shape=shape, note=f"not run: {triton_unusable}"))
        elif "triton_fwd_bwd" in include:
            row("ours fwd+bwd (backend='triton')",
                _fwd_bwd(lambda a, b_, c: attention(a, b_, c, backend="triton"), q, k, v, go),
                fl_fb, grad_errs, 4 * o_bytes)
        if "sdpa_fwd_bwd" in include and cuda:
            for be, name in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash"),
                             (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
                def sdpa(a, b_, c, be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(a, b_, c, scale=scale)
                hq, hk, hv = (x.transpose(1, 2) for x in (q, k, v))
                row(f"SDPA {name} fwd+bwd", _fwd_bwd(sdpa, hq, hk, hv, go, "bhld"), fl_fb,
                    lambda r: grad_errs(r, "bhld"), 4 * o_bytes)
        t.clear()  # q, k, ... are rebound by the next shape (briefly two shapes' inputs: a few GiB)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if "matmul" in include:  # again at the end: the ceiling is the better of the two
        matmul_row("end")
    for r in rows:
        if r.get("tflops") and not r["method"].startswith("matmul"):
            r["mfu"] = r["tflops"] / DATASHEET_BF16_TFLOPS
            if mm["tflops"]:
                r["x_matmul"] = r["tflops"] / mm["tflops"]
    _print(rows, dtype)
    summary = _summary(rows, mm["tflops"])
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                           triton=_triton_version(), dtype=dtype, matmul_tflops=mm["tflops"],
                           datasheet_tflops=DATASHEET_BF16_TFLOPS, rows=rows, summary=summary), f, indent=1)
    return rows


def _summary(rows: list[dict], mm_tflops: Optional[float]) -> list[dict]:
    """Per shape: matmul, fused JVP (TFLOP/s, ×matmul, MFU), fwd+bwd ours vs SDPA's best backend."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows if not r["method"].startswith("matmul")):
        mine = {r["method"]: r for r in rows if r["shape"] == shape and r.get("tflops")}
        jvp = next((r for m, r in mine.items() if m.startswith(("ours fused fwd+JVP", "ours fwd+JVP"))), {})
        fb = next((r for m, r in mine.items() if m.startswith("ours fwd+bwd (public op")), {})
        sdpa = [r for m, r in mine.items() if m.startswith("SDPA ") and m.endswith("fwd+bwd")]
        best = max(sdpa, key=lambda r: r["tflops"]) if sdpa else {}
        out.append(dict(shape=shape, matmul=mm_tflops, jvp=jvp.get("tflops"), jvp_x_matmul=jvp.get("x_matmul"),
                        jvp_mfu=jvp.get("mfu"), fwd_bwd=fb.get("tflops"), sdpa_best=best.get("tflops"),
                        sdpa_best_backend=best.get("method", "")[5:-8] or None,
                        ratio=(fb["tflops"] / best["tflops"]) if fb and best else None))
    print("| B·H·L·D | matmul | fused JVP | ×matmul | MFU (989) | fwd+bwd ours | SDPA best fwd+bwd | ours/SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for s in out:
        print(f"| {s['shape']} | {_fmt(s['matmul'], '.0f')} | {_fmt(s['jvp'], '.0f')} | {_fmt(s['jvp_x_matmul'], '.3f')}"
              f" | {_fmt(s['jvp_mfu'], '.3f')} | {_fmt(s['fwd_bwd'], '.0f')} | {_fmt(s['sdpa_best'], '.0f')}"
              f"{f' ({b})' if (b := s['sdpa_best_backend']) else ''} | {_fmt(s['ratio'], '.3f')} |")
    return out


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _print(rows: list[dict], dtype: str) -> None:
    cols = [("method", "method", "s"), ("shape", "B·H·L·D", "s"), ("ms", "ms", ".3f"),
            ("tflops", "TFLOP/s", ".0f"), ("x_matmul", "×mm", ".3f"), ("mfu", "MFU", ".3f"),
            ("peak_extra_gib", "peak GiB", ".3f"), ("peak_over_outputs", "×out", ".2f"),
            ("first_call_s", "1st s", ".2f"), ("err_out", "err out", ".1e"),
            ("err_tangent", "err tan", ".1e"), ("err_dq", "err dq", ".1e"),
            ("err_dk", "err dk", ".1e"), ("err_dv", "err dv", ".1e"), ("note", "note", "s")]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu, interpreter"
    print(f"rcm bench attention ({dtype}, {name}, torch {torch.__version__}, "
          f"triton {_triton_version()}); MFU against {DATASHEET_BF16_TFLOPS:.0f} TFLOP/s")
    print("| " + " | ".join(h for _, h, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(key), spec) for key, _, spec in cols) + " |")


def bench_attention(cfg: BenchAttentionConfig) -> list[dict]:
    """Time the attention paths side by side and print the table of ratios."""
    return run_attention_bench(cfg.parsed_shapes(), cfg.dtype, cfg.include, cfg.out_json)


if __name__ == "__main__":
    try:
        import tyro
    except ImportError:  # the GPU machine's image has no tyro: defaults, and --out-json PATH only
        import sys

        args = sys.argv[1:]
        out = args[args.index("--out-json") + 1] if "--out-json" in args else None
        bench_attention(BenchAttentionConfig(out_json=out))
    else:
        bench_attention(tyro.cli(BenchAttentionConfig))
