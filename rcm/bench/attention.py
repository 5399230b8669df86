"""`rcm bench attention`: our Triton attention kernels against the alternatives, one process.

Every row runs on the same inputs (random normal, layout [B, L, H, D]) and reports the median time
(triton.testing.do_bench), TFLOP/s, peak extra memory (peak allocated during one call minus what
was allocated before it, outputs included), the wall time of the first call of that row in this
process (compile and autotune included), and the relative L2 error against a float64 reference
evaluated on a sample of heads, query rows and key rows (full fp64 attention at L=32760 would not
fit). FLOP counts: JVP 12·B·H·Lq·Lk·D (six matmuls), forward 4·B·H·Lq·Lk·D, backward
10·B·H·Lq·Lk·D (five matmuls, the FlashAttention convention). Ratios: TFLOP/s over the bf16
8192³ matmul measured in the same run, and speed-ups of our fused JVP over jvp-flash-attention and
over torch.func.jvp through SDPA-math.
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

import torch

DEFAULT_SHAPES = [(2, 24, 4096, 128), (1, 12, 32760, 128), (1, 40, 32760, 128), (1, 24, 4096, 64)]
ALL = ("ours_jvp", "ours_fwd", "ours_bwd", "jvp_flash_attention", "sdpa_math_jvp",
       "sdpa_cudnn_fwd", "sdpa_flash_fwd", "sdpa_cudnn_bwd", "sdpa_flash_bwd", "matmul")
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


# ---- runners -----------------------------------------------------------------------------------


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
        return time.perf_counter() - t0, float("nan"), res
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
    """TFLOP/s of an n³ bf16 matmul on ``device``: the chip's practical ceiling, for ratios and MFU.
    The default budget is long enough for the clocks to settle."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _bench(lambda: a @ b, budget_ms) / 1e9


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


def run_attention_bench(shapes: Optional[Iterable] = None, dtype: str = "bf16",
                        include: Iterable[str] = ALL, out_json: Optional[str] = None,
                        fresh_cache: bool = True, budget_ms: int = 400,
                        math_jvp_max_gib: float = 40.0) -> list[dict]:
    """Time the attention kernels; print a table; return one dict per row (and write JSON)."""
    if fresh_cache and "TRITON_CACHE_DIR" not in os.environ:
        import tempfile
        # first-call figures must include compilation: start from an empty Triton cache
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rcm-triton-cache-")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rcm.kernels import triton_attention as ta

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("rcm bench attention needs a CUDA device (or TRITON_INTERPRET=1 for a "
                         "smoke run on tiny shapes)")
    include = set(include)
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    dt = _DT[dtype]
    dev = torch.device("cuda" if cuda else "cpu")
    n_mm = 8192 if cuda else 256
    rows: list[dict] = []

    mm_tflops = None

    def matmul_row(when):
        tflops = matmul_tflops(dev, n_mm, 3 * budget_ms)
        r = dict(method=f"matmul bf16 {n_mm}^3", shape=f"{n_mm}^3", ms=2 * n_mm**3 / tflops / 1e9,
                 tflops=tflops, note=when)
        rows.append(r)
        return r["tflops"]

    if "matmul" in include:
        mm_tflops = matmul_row("first; ratios use the larger of the two matmul runs")

    jfa = _jvp_flash_attention()

    for (B, H, L, D) in shapes:
        t = _inputs(B, H, L, D, dt, dev)
        scale = D ** -0.5
        shape = f"{B}x{H}x{L}x{D}"
        ref = _Ref(t, scale)
        q, k, v, qd, kd, vd, go = (t[n] for n in ("q", "k", "v", "qd", "kd", "vd", "go"))
        fl_jvp, fl_fwd, fl_bwd = (c * B * H * L * L * D for c in (12, 4, 10))

        def row(method, fn, flops, errs, out_bytes, note=""):
            try:
                first, peak, res = _measure(fn)
                e = errs(res)
                del res
                ms = _bench(fn, budget_ms)
                tf = flops / ms / 1e9
                r = dict(method=method, shape=shape, ms=ms, tflops=tf, first_call_s=first,
                         peak_extra_gib=peak / 2**30, peak_over_outputs=peak / out_bytes,
                         note=note, **e)
            except torch.OutOfMemoryError:
                r = dict(method=method, shape=shape, note="out of memory")
            except Exception as ex:  # one broken alternative must not hide the others
                r = dict(method=method, shape=shape, note=f"failed: {type(ex).__name__}: {ex}"[:160])
            if mm_tflops and r.get("tflops"):
                r["x_matmul"] = r["tflops"] / mm_tflops
            rows.append(r)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return r

        o_bytes = _nbytes(q)  # one output [B, L, H, D]
        lse_bytes = B * H * L * 4
        ours_jvp = None
        if "ours_jvp" in include:
            ours_jvp = row(
                "ours fused fwd+JVP", lambda: ta.forward_jvp(q, k, v, qd, kd, vd, scale), fl_jvp,
                lambda r: dict(err_out=ref.err("out", r[0]), err_tangent=ref.err("out_dot", r[1]),
                               err_lse=ref.err("lse", r[2])),
                2 * o_bytes + lse_bytes)
        if "jvp_flash_attention" in include:
            if isinstance(jfa, Exception):
                rows.append(dict(method="jvp-flash-attention 0.14", shape=shape,
                                 note=f"not installed ({type(jfa).__name__})"))
            else:
                qh, kh, vh, qdh, kdh, vdh = (x.transpose(1, 2).contiguous()
                                             for x in (q, k, v, qd, kd, vd))
                row("jvp-flash-attention 0.14",
                    lambda: torch.func.jvp(lambda a, b_, c: jfa(a, b_, c, sm_scale=scale),
                                           (qh, kh, vh), (qdh, kdh, vdh)),
                    fl_jvp, lambda r: dict(err_out=ref.err("out", r[0], "bhld"),
                                           err_tangent=ref.err("out_dot", r[1], "bhld")),
                    2 * o_bytes, note="inputs pre-made [B,H,L,D] contiguous")
                del qh, kh, vh, qdh, kdh, vdh
        if "sdpa_math_jvp" in include:
            est = 4 * B * H * L * L * 4 / 2**30  # several fp32 L x L buffers
            if est > math_jvp_max_gib:
                rows.append(dict(method="torch.func.jvp(SDPA math)", shape=shape,
                                 note=f"skipped: needs > {est:.0f} GiB (L x L buffers)"))
            else:
                qh, kh, vh, qdh, kdh, vdh = (x.transpose(1, 2) for x in (q, k, v, qd, kd, vd))

                def math_jvp():
                    with sdpa_kernel(SDPBackend.MATH):
                        return torch.func.jvp(
                            lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, scale=scale),
                            (qh, kh, vh), (qdh, kdh, vdh))
                row("torch.func.jvp(SDPA math)", math_jvp, fl_jvp,
                    lambda r: dict(err_out=ref.err("out", r[0], "bhld"),
                                   err_tangent=ref.err("out_dot", r[1], "bhld")), 2 * o_bytes)
        fwd_out = None
        if "ours_fwd" in include:
            route = ta.forward_route(q)
            row("ours forward (triton)", lambda: ta._forward_triton(q, k, v, scale), fl_fwd,
                lambda r: dict(err_out=ref.err("out", r[0]), err_lse=ref.err("lse", r[1])),
                o_bytes + lse_bytes)
            if route != "triton":
                r = row(f"ours forward (routed: {route})", lambda: ta.forward(q, k, v, scale),
                        fl_fwd, lambda r: dict(err_out=ref.err("out", r[0]), err_lse=ref.err("lse", r[1])),
                        o_bytes + lse_bytes)
                if any(x[0] == route for x in ta._REFUSED):
                    r["note"] = f"{route} refused these inputs: ran the Triton kernel"
        hq, hk, hv = (x.transpose(1, 2) for x in (q, k, v))
        for be, name in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
            if f"sdpa_{name}_fwd" in include:
                def sdpa_fwd(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(hq, hk, hv, scale=scale)
                row(f"SDPA {name} forward", sdpa_fwd, fl_fwd,
                    lambda r: dict(err_out=ref.err("out", r, "bhld")), o_bytes)
        if "ours_bwd" in include or any(f"sdpa_{n}_bwd" in include for n in ("cudnn", "flash")):
            fwd_out, fwd_lse = ta.forward(q, k, v, scale)
            fwd_out = fwd_out.contiguous() if fwd_out.stride(-1) != 1 else fwd_out
            gerr = lambda r, lay="blhd": dict(err_dq=ref.err("dq", r[0], lay),  # noqa: E731
                                              err_dk=ref.err("dk", r[1], lay),
                                              err_dv=ref.err("dv", r[2], lay))
            if "ours_bwd" in include:
                row("ours backward (triton)",
                    lambda: ta._bwd_triton(go, q, k, v, fwd_out, fwd_lse, scale), fl_bwd, gerr,
                    3 * o_bytes)
                broute = ta.backward_route(q)
                if broute != "triton":
                    r = row(f"ours backward (routed: {broute})",
                            lambda: ta.backward(go, q, k, v, fwd_out, fwd_lse, scale), fl_bwd, gerr,
                            3 * o_bytes)
                    if any(x[0] == "bwd-" + broute for x in ta._REFUSED):
                        r["note"] = f"{broute} refused these inputs: ran the Triton kernels"
            for be, name in ((SDPBackend.CUDNN_ATTENTION, "cudnn"),
                             (SDPBackend.FLASH_ATTENTION, "flash")):
                if f"sdpa_{name}_bwd" not in include:
                    continue
                try:
                    lq, lk, lv = (x.detach().requires_grad_() for x in (hq, hk, hv))
                    with sdpa_kernel(be):
                        o = F.scaled_dot_product_attention(lq, lk, lv, scale=scale)
                    ho = go.transpose(1, 2)
                    row(f"SDPA {name} backward",
                        lambda: torch.autograd.grad(o, (lq, lk, lv), ho, retain_graph=True),
                        fl_bwd, lambda r: gerr(r, "bhld"), 3 * o_bytes)
                    del o, lq, lk, lv
                except Exception as ex:
                    rows.append(dict(method=f"SDPA {name} backward", shape=shape,
                                     note=f"failed: {type(ex).__name__}: {ex}"[:160]))
            del fwd_out, fwd_lse
        # ratios for this shape
        if ours_jvp and ours_jvp.get("ms"):
            for r in rows:
                if r.get("shape") == shape and r.get("ms") and r["method"] in (
                        "jvp-flash-attention 0.14", "torch.func.jvp(SDPA math)"):
                    r["ours_jvp_speedup"] = r["ms"] / ours_jvp["ms"]
        del t, q, k, v, qd, kd, vd, go, hq, hk, hv, ref
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if "matmul" in include:  # again at the end: the ceiling is the better of the two
        mm2 = matmul_row("last")
        if mm2 > mm_tflops:
            mm_tflops = mm2
            for r in rows:
                if r.get("tflops") and "matmul" not in r["method"]:
                    r["x_matmul"] = r["tflops"] / mm_tflops
    _print(rows, dtype)
    for r in rows:  # the acceptance figures of issue 3, one line per shape
        if r["method"] == "ours fused fwd+JVP" and r.get("ms"):
            others = {o["method"]: o.get("ours_jvp_speedup") for o in rows
                      if o.get("shape") == r["shape"] and o.get("ours_jvp_speedup")}
            print(f"fused JVP {r['shape']}: {r['tflops']:.0f} TFLOP/s = {r.get('x_matmul', 0):.3f} x matmul;"
                  f" first call {r['first_call_s']:.2f} s; peak extra {r['peak_over_outputs']:.2f} x outputs;"
                  f" err out {r['err_out']:.1e} tangent {r['err_tangent']:.1e};"
                  + "".join(f"; {v:.1f}x the speed of {k}" for k, v in others.items()))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                           torch=torch.__version__,
                           triton=__import__("triton").__version__, dtype=dtype, rows=rows), f,
                      indent=1)
    return rows


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _print(rows: list[dict], dtype: str) -> None:
    cols = [("method", "method", "s"), ("shape", "B·H·L·D", "s"), ("ms", "ms", ".3f"),
            ("tflops", "TFLOP/s", ".0f"), ("x_matmul", "×mm", ".2f"),
            ("peak_extra_gib", "peak GiB", ".3f"), ("peak_over_outputs", "×out", ".2f"),
            ("first_call_s", "1st s", ".2f"), ("err_out", "err out", ".1e"),
            ("err_tangent", "err tan", ".1e"), ("err_dq", "err dq", ".1e"),
            ("err_dk", "err dk", ".1e"), ("err_dv", "err dv", ".1e"),
            ("ours_jvp_speedup", "ours×", ".1f"), ("note", "note", "s")]
    try:
        from rich.console import Console
        from rich.table import Table
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu, interpreter"
        tab = Table(title=f"rcm bench attention ({dtype}, {name})")
        for _, head, _ in cols:
            tab.add_column(head, overflow="fold")
        for r in rows:
            tab.add_row(*(_fmt(r.get(key), spec) for key, _, spec in cols))
        Console(width=240).print(tab)
    except ImportError:
        print(" | ".join(h for _, h, _ in cols))
        for r in rows:
            print(" | ".join(_fmt(r.get(key), spec) for key, _, spec in cols))


BenchRow = Literal[ALL]


@dataclass
class BenchAttentionConfig:
    """Time our attention kernels against the alternatives on the same inputs (needs CUDA for real figures;
    on the CPU it runs a tiny smoke version under the Triton interpreter)."""

    shapes: tuple[str, ...] = tuple(",".join(map(str, s)) for s in DEFAULT_SHAPES)  # B,H,L,D each
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    include: tuple[BenchRow, ...] = ALL
    out_json: Optional[str] = None

    def parsed_shapes(self) -> list[tuple[int, int, int, int]]:
        shapes = []
        for entry in self.shapes:
            parts = entry.split(",")
            if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"--shapes: {entry!r} is not B,H,L,D with four positive integers")
            shapes.append(tuple(int(p) for p in parts))
        return shapes


def bench_attention(cfg: BenchAttentionConfig) -> list[dict]:
    """Time the attention kernels side by side and print the table of ratios."""
    return run_attention_bench(cfg.parsed_shapes(), cfg.dtype, cfg.include, cfg.out_json)


if __name__ == "__main__":
    import tyro

    bench_attention(tyro.cli(BenchAttentionConfig))
