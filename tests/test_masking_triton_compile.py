"""The Triton masking kernels compiled for sm_90 without a GPU (Triton's own compiler and ptxas).

The interpreter runs the kernels' logic but not their typing or code generation; this compiles
the row-copy kernel for every dtype and flag combination the launcher uses, checks that the
bf16 D=768 copy moves 16-byte vectors (four loads and four stores per thread at the default
16 x 256 tile and 4 warps), and compiles the CSR kernel and the index (rank) kernel.  It runs in a subprocess because the
test session sets TRITON_INTERPRET=1 before the kernels are defined."""
import os
import sys

import pytest

import _background
from fastcl.ops.dispatch import triton_available

SCRIPT = r'''
import re, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastcl.kernels import masking as km

TARGET = GPUTarget("cuda", 90, 32)
INTS = ["BR", "R", "D", "S", "n_dblocks", "stride_sb", "stride_ss", "stride_ob", "stride_or",
        "stride_tb", "stride_tr", "stride_qb", "stride_qj", "stride_ps"]


def row_copy(dt, out_dt, order, fill, pos, even_d, rows=16, block_d=256, warps=4):
    sig = {"src": "*" + dt, "start": "*i64", "order": "*i64", "fill": "*" + dt, "pos": "*" + dt,
           "out": "*" + out_dt}
    sig.update({n: "i32" for n in INTS})
    consts = dict(HAS_ORDER=order, HAS_FILL=fill, HAS_POS=pos, CONVERT=pos or dt != out_dt,
                  ACC_F64=dt == "fp64", BF16_RNE_BY_HAND=False, EVEN_D=even_d, ROWS=rows, BLOCK_D=block_d)
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    # What launch-time specialisation gives for D = 768 tensors: 16-byte aligned pointers, and
    # D and the row strides divisible by 16.
    hinted = ["src", "start", "order", "fill", "pos", "out", "D", "stride_sb", "stride_ss", "stride_ob",
              "stride_or"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    return triton.compile(ASTSource(fn=km._row_copy_kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=TARGET, options={"num_warps": warps})


for dt, out_dt in [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "fp32")]:
    for pos in (False, True):
        for even_d, order, fill in [(True, False, False), (False, True, True)]:
            row_copy(dt, out_dt, order, fill, pos, even_d)
ptx = row_copy("bf16", "bf16", False, False, False, True).asm["ptx"]
loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))
stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx))
assert (loads, stores) == (4, 4), (loads, stores)

sig = {"src": "*bf16", "start": "*i64", "count": "*i64", "order": "*i64", "fill": "*bf16", "pos": "*bf16",
       "out": "*fp32"}
sig.update({n: "i32" for n in ["R", "D", "S", "stride_sb", "stride_ss", "stride_ob", "stride_or", "stride_tb",
                               "stride_tr", "stride_cb", "stride_cr", "stride_qb", "stride_qj", "stride_ps"]})
consts = dict(HAS_COUNT=True, HAS_ORDER=True, HAS_FILL=True, HAS_POS=True, ACC_F64=False,
              BF16_RNE_BY_HAND=False, BLOCK_D=1024)
sig.update({k: "constexpr" for k in consts})
triton.compile(ASTSource(fn=km._segment_gather_kernel, signature=sig, constexprs=consts), target=TARGET,
               options={"num_warps": 4})

for dt, mask_dt in [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")]:
    sig = {"noise": "*" + dt, "ids_restore": "*i64", "ids_keep": "*i64", "mask": "*" + mask_dt}
    sig.update({n: "i32" for n in ["L", "K", "stride_nb", "stride_nl"]})
    consts = dict(KEY_F64=dt == "fp64", BLOCK_I=64, BLOCK_J=64)
    sig.update({k: "constexpr" for k in consts})
    triton.compile(ASTSource(fn=km._mask_indices_kernel, signature=sig, constexprs=consts), target=TARGET,
                   options={"num_warps": 4})
print("ok")
'''


_background.job("triton-sm90:masking", lambda: _background.run(
    [sys.executable, "-c", SCRIPT], env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, timeout=600))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.background("triton-sm90:masking")
def test_triton_masking_kernels_compile_for_sm90_with_vector_access():
    proc = _background.result("triton-sm90:masking")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
