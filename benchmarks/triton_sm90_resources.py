"""Resource usage of the Triton loss kernels on sm_90 (H100/H200), read without a GPU.

Compiles the LSE forward kernel and the strip-gradient (dS) kernel (or, with ``--others``, the
sigmoid-pair kernels at the launchers' automatic modes and the opt-in fused LSE gradient kernel)
with Triton's own compiler for
an sm_90 target and reads the cubin with the ``cuobjdump`` that ships with Triton: registers per
thread, spill instructions (STL/LDL in the SASS), shared memory, warpgroup MMAs (``HGMMA``) and
how many programs fit on one SM at once (by registers and by shared memory; 64K registers and
227 KB of shared memory per SM).  Integer arguments are compiled as divisible by 16, as Triton
specialises them at the CLIP target shape (N = M = 32768, D = 768).

    python benchmarks/triton_sm90_resources.py                    # default shapes, every dtype
    python benchmarks/triton_sm90_resources.py --sweep            # bf16 at the autotuner's shapes
    python benchmarks/triton_sm90_resources.py --shared-exp       # the FASTCL_TRITON_EXP=shared kernels
    python benchmarks/triton_sm90_resources.py --others           # sigmoid-pair and fused-gradient kernels
    python benchmarks/triton_sm90_resources.py --json OUT.json

Runs with TRITON_INTERPRET unset (the kernels must be compiled, not interpreted).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

REGS_PER_SM = 65536
SMEM_PER_SM = 227 * 1024
TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (ROWS, COLS, HAS_DIAG) of the launches: CLIP (both sides), InfoNCE (rows), columns alone, NT-Xent.
FLAG_SETS = [(True, True, False), (True, False, False), (False, True, False), (True, True, True)]


def _compile(fn, ptrs, ints, consts, warps, stages, maxnreg=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(ptrs)
    sig.update({n: "i32" for n in ints})
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    hinted = [n for n in names if n.endswith("_ptr") or n in ints]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})})


def usage(compiled, warps: int) -> dict:
    """Registers, stack, spill instructions, shared memory, HGMMA/HMMA and MUFU.LG2 (hardware log2)
    counts, and programs per SM."""
    import triton.backends.nvidia as nv
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump's output: {res[:500]}")
    reg, stack, _, local = (int(v) for v in m.groups())
    smem = int(compiled.metadata.shared)
    # Registers are allocated per warp in units of 256 (8 per thread).
    per_warp = -(-reg * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // smem if smem else 32
    return {"regs": reg, "stack": stack, "local": local, "spill_ops": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
            "smem": smem, "hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass)),
            "mufu_lg2": len(re.findall(r"\bMUFU\.LG2\b", sass)),
            # Static SASS instructions (each loop body counted once; a rough proxy for per-tile work).
            "instrs": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M)),
            "programs_per_sm": min(by_regs, by_smem)}


def kernel_usage(kernel: str, dtype: str, rows: bool, cols: bool, diag: bool, shape=None,
                 shared_exp: bool = False, ragged: bool = False) -> dict:
    """Compile ``kernel`` ("fwd" or "dscore_strip") for ``dtype`` at ``shape`` (BLOCK_M, BLOCK_N,
    BLOCK_D, num_warps, num_stages; default: the launcher's ``_config``) and return its usage;
    ``shared_exp`` compiles the FASTCL_TRITON_EXP=shared variant, ``ragged`` the forward's variant
    with the bounds select (sizes that are not whole tiles)."""
    from fastcl.kernels import similarity_lse as K

    cfg = K._config(torch.empty(8, 768, dtype=TYPES[dtype], device="meta"))  # flags of a GPU launch
    if shape is None:  # the row-only forward has its own shape (_config's roles)
        shape = K.gpu_launch_shape(TYPES[dtype], role="lse_rows" if kernel == "fwd" and not cols else "lse")
    bm, bn, bd, warps, stages, *cap = shape
    consts = dict(ROWS=rows, COLS=cols, HAS_DIAG=diag, SHARED_EXP=shared_exp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                  UPCAST=cfg["UPCAST"], IS_FP32=cfg["IS_FP32"], PRECISION=cfg["PRECISION"])
    ptr = "*" + dtype
    if kernel == "fwd":
        # Whole tiles as at N = M = 32768 unless ``ragged`` (then every score gets a bounds select).
        consts.update(FAST_LOG=cfg["FAST_LOG"], MASK_BOUNDS=ragged)
        c = _compile(K._lse_fwd_kernel,
                     {"q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "row_ptr": "*fp32",
                      "colpart_ptr": "*fp32"},
                     ["N", "M", "D", "stride_q", "stride_k", "diag_off", "col_span"], consts, warps, stages, *cap)
    elif kernel == "dscore_strip":
        finished = K.finished_tiles(TYPES[dtype])
        c = _compile(K._dscore_strip_kernel,
                     {"q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "row_ptr": "*fp32",
                      "grow_ptr": "*fp32", "col_ptr": "*fp32", "gcol_ptr": "*fp32", "ds_ptr": ptr,
                      "gs_ptr": "*fp32", "gpos_ptr": "*fp32", "pos_ptr": "*i64"},
                     ["row0", "N_STRIP", "col0", "N_COLS", "D", "stride_q", "stride_k", "stride_ds", "diag_off"],
                     # the tile CLIP's backward forms (positives (i, i)), finished where the launcher finishes it
                     dict(consts, FINAL=finished, POS=1 if finished else 0),
                     warps, stages)  # a register cap reaches the forward only (_config)
    else:
        raise ValueError(f"kernel must be 'fwd' or 'dscore_strip', got {kernel!r}")
    return {"kernel": kernel + ("/ragged" if ragged and kernel == "fwd" else ""), "dtype": dtype, "rows": rows,
            "cols": cols, "diag": diag, "shared_exp": shared_exp, "shape": ",".join(map(str, shape)),
            **usage(c, warps)}


def default_rows(shared_exp: bool = False) -> list:
    """Both kernels at the default shapes: every flag set for bf16, CLIP's for fp16 and fp32; and
    the forward's ragged-size variant for every bf16 flag set."""
    out = []
    for dtype in TYPES:
        for rows, cols, diag in FLAG_SETS if dtype == "bf16" else FLAG_SETS[:1]:
            for kernel in ("fwd", "dscore_strip"):
                out.append(kernel_usage(kernel, dtype, rows, cols, diag, shared_exp=shared_exp))
    out += [kernel_usage("fwd", "bf16", *flags, shared_exp=shared_exp, ragged=True) for flags in FLAG_SETS]
    return out


def sweep_rows(shared_exp: bool = False) -> list:
    """Both kernels, bf16, CLIP flags, at every shape of the opt-in autotuner's list."""
    from fastcl.kernels import similarity_lse as K
    return [kernel_usage(kernel, "bf16", True, True, False, shape, shared_exp=shared_exp)
            for shape in K.TUNE_SHAPES for kernel in ("fwd", "dscore_strip")]


def _flat(cfg: dict, warps: int, stages: int, blocks=("BLOCK_M", "BLOCK_N", "BLOCK_D")) -> str:
    """The "BLOCK_M,BLOCK_N,BLOCK_D,warps,stages" string of a launch configuration dict."""
    return ",".join(map(str, [cfg[k] for k in blocks] + [warps, stages]))


def other_rows() -> list:
    """The sigmoid-pair kernels of each dtype in the mode ``sigmoid_mode`` picks (D = 128, 256, 768),
    and the opt-in fused LSE gradient kernel (FASTCL_TRITON_BWD=fused) at D = 128."""
    from fastcl.kernels import sigmoid_pair as S
    from fastcl.kernels import similarity_lse as K

    out = []

    def row(kernel, dtype, d, mode, compiled, shape, warps):
        out.append({"kernel": kernel, "dtype": dtype, "D": d, "mode": mode, "shape": shape,
                    **usage(compiled, warps)})

    scalars = {"scale_ptr": "*fp32", "bias_ptr": "*fp32"}
    for dtype, torch_dtype in TYPES.items():
        ptr = "*" + dtype
        for d in (128, 256, 768):
            q = torch.empty(8, d, dtype=torch_dtype, device="meta")
            mode = S.sigmoid_mode(q)
            if mode == "fused":
                cfg = dict(S._config(q, q), MASK_BOUNDS=False)  # Triton's default 4 warps, 3 stages; whole tiles
                c = _compile(S._fwd_kernel, {"q_ptr": ptr, "k_ptr": ptr, "part_ptr": "*fp32", **scalars},
                             ["N", "M", "D", "stride_q", "stride_k"], cfg, 4, 3)
                row("sigmoid_fwd", dtype, d, mode, c, _flat(cfg, 4, 3), 4)
                c = _compile(S._bwd_rows_kernel, {"q_ptr": ptr, "k_ptr": ptr, "gq_ptr": "*fp32", "gpart_ptr": "*fp32",
                                                  **scalars},
                             ["N", "M", "D", "stride_q", "stride_k", "stride_gq"], cfg, 4, 3)
                row("sigmoid_bwd_rows", dtype, d, mode, c, _flat(cfg, 4, 3), 4)
            else:
                sc = K._config(q, "sigmoid")
                consts = {k: sc[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "IS_FP32", "PRECISION")}
                consts["MASK_BOUNDS"] = False  # whole tiles, as at N = M = 32768
                warps, stages = sc["launch"]["num_warps"], sc["launch"]["num_stages"]
                c = _compile(S._fwd_chunked_kernel, {"q_ptr": ptr, "k_ptr": ptr, "part_ptr": "*fp32", **scalars},
                             ["N", "M", "D", "stride_q", "stride_k", "col_span"], consts, warps, stages)
                row("sigmoid_fwd_chunked", dtype, d, mode, c, _flat(sc, warps, stages), warps)
                c = _compile(S._grad_strip_kernel, {"q_ptr": ptr, "k_ptr": ptr, **scalars, "g_ptr": ptr,
                                                    "gpart_ptr": "*fp32"},
                             ["row0", "N_STRIP", "col0", "N_COLS", "D", "stride_q", "stride_k", "stride_g"], consts,
                             warps, stages)
                row("sigmoid_grad_strip", dtype, d, mode, c, _flat(sc, warps, stages), warps)
        cfg = K.grad_fused_config(torch.empty(8, 128, dtype=torch_dtype, device="meta"))
        launch = cfg.pop("launch")
        consts = dict(A_STATS=True, B_STATS=True, HAS_DIAG=False, SHARED_EXP=False, **cfg)
        stats = {n: "*fp32" for n in ("lse_a_ptr", "g_a_ptr", "lse_b_ptr", "g_b_ptr", "out_ptr")}
        c = _compile(K._grad_fused_kernel, {"a_ptr": ptr, "b_ptr": ptr, **scalars, **stats},
                     ["NA", "NB", "D", "stride_a", "stride_b", "stride_o", "diag_off"], consts,
                     launch["num_warps"], launch["num_stages"])
        shape = _flat(cfg, launch["num_warps"], launch["num_stages"], ("BLOCK_A", "BLOCK_B", "BLOCK_D"))
        row("lse_grad_fused", dtype, 128, "fused (opt-in)", c, shape, launch["num_warps"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="bf16 at the autotuner's shapes instead of the defaults")
    ap.add_argument("--shared-exp", action="store_true", help="the FASTCL_TRITON_EXP=shared variant")
    ap.add_argument("--others", action="store_true", help="the sigmoid-pair and fused LSE gradient kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be compiled")
    if args.others:
        rows = other_rows()
        print(f"{'kernel':<20} {'dtype':<5} {'D':>4} {'mode':<15} {'shape':<16} {'regs':>4} {'spills':>6} "
              f"{'smem KB':>7} {'HGMMA':>5} {'HMMA':>5} {'per SM':>6} {'instrs':>6}")
        for r in rows:
            print(f"{r['kernel']:<20} {r['dtype']:<5} {r['D']:>4} {r['mode']:<15} {r['shape']:<16} {r['regs']:>4} "
                  f"{r['spill_ops']:>6} {r['smem'] / 1024:>7.0f} {r['hgmma']:>5} {r['hmma']:>5} {r['programs_per_sm']:>6} "
                  f"{r['instrs']:>6}")
    else:
        rows = sweep_rows(args.shared_exp) if args.sweep else default_rows(args.shared_exp)
        print(f"{'kernel':<13} {'dtype':<5} {'rows':<5} {'cols':<5} {'diag':<5} {'shape':<18} {'regs':>4} {'spills':>6} "
              f"{'smem KB':>7} {'HGMMA':>5} {'per SM':>6} {'instrs':>6}")
        for r in rows:
            print(f"{r['kernel']:<13} {r['dtype']:<5} {r['rows']!s:<5} {r['cols']!s:<5} {r['diag']!s:<5} {r['shape']:<18} "
                  f"{r['regs']:>4} {r['spill_ops']:>6} {r['smem'] / 1024:>7.0f} {r['hgmma']:>5} {r['programs_per_sm']:>6} "
                  f"{r['instrs']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
