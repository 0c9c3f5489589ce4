"""Which fused GPU backend ``auto`` picks for CUDA tensors, per op, dtype and shape (the losses'
similarity_lse and sigmoid_pair by N and D, the masking ops by B * L tokens and D).

NOT MEASURED YET.  No GPU has timed the cuda backend against triton, so every problem goes to
``DEFAULT`` ("triton", the backend with GPU measurements behind it).  To fill the table, run on
the GPU that should decide (it times forward + backward of both backends over the grid below
and writes this file, with the GPU's name in MEASURED_ON):

    python benchmarks/gpu_bench.py --dispatch-table fastcl/ops/dispatch_table.py

Lookup (``fastcl.ops.dispatch.pick_gpu_backend``): the grid point nearest in log2 of
sqrt(N * M) and of D, among the entries for the op and dtype; DEFAULT where there is none.
"""

MEASURED_ON = None
DEFAULT = "triton"
GRID_N = (4096, 16384, 32768)
GRID_D = (64, 256, 768, 2048)

# (op, dtype name, N, D) -> "triton" or "cuda"; N = M at every measured point.
TABLE = {}
