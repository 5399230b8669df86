"""Device sweep for the fused forward+JVP Triton kernel: the matmul ceiling, then each variant's
correctness (relative L2 vs float64 on sampled rows) and speed, one JSON line each.

Run on the GPU machine (scripts/device_attention.sh sweep); writes $OUT/sweep.jsonl and prints a
table last. Variants are `Cfg`s passed as arguments (tuning is an argument of the launch).
"""
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="sweep-cache-"))
import torch  # noqa: E402
import triton  # noqa: E402

from rcm.bench.attention import DATASHEET_BF16_TFLOPS, _inputs, _Ref, matmul_tflops  # noqa: E402
from rcm.kernels import triton_attention as ta  # noqa: E402
from rcm.kernels.triton_attention import Cfg  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
BUDGET = float(os.environ.get("SWEEP_BUDGET_S", "270"))
LOG = open(os.path.join(OUT, "sweep.jsonl"), "a")
RESULTS = []


def rec(**d):
    d["t"] = round(time.time() - T0, 1)
    line = json.dumps(d)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()
    return d


def kinfo(k):
    try:
        return dict(regs=k.n_regs, spills=k.n_spills, smem=k.metadata.shared)
    except Exception:
        return {}


_DATA = {}


def data(shape):
    if shape not in _DATA:
        _DATA.clear()
        B, H, L, D = shape
        t = _inputs(B, H, L, D, torch.bfloat16, torch.device("cuda"))
        _DATA[shape] = (t, _Ref(t, D ** -0.5, n_heads=2, n_rows=128))
    return _DATA[shape]


def variant(cfg, shape, mm):
    if time.time() - T0 > BUDGET:
        return rec(what="skipped (budget)", cfg=cfg._asdict(), shape=shape)
    t, ref = data(shape)
    B, H, L, D = shape
    sc = D ** -0.5
    args = [t[n] for n in ("q", "k", "v", "qd", "kd", "vd")]
    try:
        t0 = time.perf_counter()
        (out, od, lse), kern = ta.launch_forward(*args, sc, cfg)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        errs = dict(e_out=ref.err("out", out), e_tan=ref.err("out_dot", od), e_lse=ref.err("lse", lse))
        del out, od, lse
        ms = triton.testing.do_bench(lambda: ta.launch_forward(*args, sc, cfg), warmup=50, rep=250,
                                     return_mode="median")
        tf = 12 * B * H * L * L * D / ms / 1e9
        ok = errs["e_out"] < 5e-3 and errs["e_tan"] < 5e-3 and errs["e_lse"] < 1e-4
        r = rec(what="variant", cfg=cfg._asdict(), shape=shape, ms=round(ms, 3), tflops=round(tf, 1),
                x_mm=round(tf / mm, 3), mfu=round(tf / DATASHEET_BF16_TFLOPS, 3), first_s=round(first, 2),
                correct=ok, **{k_: float(f"{v_:.2e}") for k_, v_ in errs.items()}, **kinfo(kern))
        RESULTS.append(r)
        return r
    except Exception as e:
        return rec(what="variant failed", cfg=cfg._asdict(), shape=shape, err=f"{type(e).__name__}: {e}"[:300])


def main(stage="all"):
    mm = matmul_tflops(torch.device("cuda"))
    rec(what="matmul", tflops=round(mm, 1), device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__)
    S2, S1, S4 = (2, 24, 4096, 128), (1, 12, 32760, 128), (1, 24, 4096, 64)
    d128 = [Cfg(128, 64, 8, 2, early=True), Cfg(128, 64, 8, 2, early=True, ws=True),
            Cfg(128, 64, 8, 2, early=True, tma=True), Cfg(128, 64, 8, 2, early=True, tma=True, ws=True),
            Cfg(256, 64, 16, 2, early=True), Cfg(256, 64, 16, 1, early=True),
            Cfg(128, 64, 8, 2, early=True, lazy=False), Cfg(128, 128, 8, 1, early=True, ws=True)]
    d64 = [Cfg(64, 64, 4, 3, tma=True), Cfg(128, 64, 8, 2, early=True), Cfg(128, 64, 8, 3, early=True),
           Cfg(128, 128, 8, 2, early=True), Cfg(128, 64, 8, 3, early=True, tma=True),
           Cfg(128, 64, 8, 2, early=True, ws=True), Cfg(64, 128, 4, 2, early=True, tma=True),
           Cfg(256, 64, 16, 2, early=True)]
    if stage == "d64":  # the follow-up round around the D=64 winner of the first
        d128, d64 = [], [Cfg(128, 128, 8, 2, early=True), Cfg(128, 128, 8, 2, early=True, tma=True),
                         Cfg(128, 128, 8, 2), Cfg(128, 128, 8, 2, early=True, lazy=False)]
    for c in d128:
        variant(c, S2, mm)
    best = sorted((r for r in RESULTS if r["correct"]), key=lambda r: -r["tflops"])[:3]
    for r in best:
        variant(Cfg(**r["cfg"]), S1, mm)
    for c in d64:
        variant(c, S4, mm)
    rec(what="matmul (end)", tflops=round(matmul_tflops(torch.device("cuda")), 1))
    print("| shape | cfg | TFLOP/s | ×mm | MFU | regs | spills | smem | err out / tan |")
    for r in RESULTS:
        c = ",".join(f"{k}={v}" for k, v in r["cfg"].items())
        print(f"| {r['shape']} | {c} | {r['tflops']} | {r['x_mm']} | {r['mfu']} | {r.get('regs')} | "
              f"{r.get('spills')} | {r.get('smem')} | {r['e_out']:.1e} / {r['e_tan']:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
