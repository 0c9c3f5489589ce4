"""Which fused GPU backend ``auto`` picks for CUDA tensors, per op, dtype and shape.

Measured on NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, commit 275e1b9, 2026-11-28:
forward + backward of similarity_lse (rows and columns) and sigmoid_pair_loss at N = M, and of
random_masking on N // 196 samples of 196 tokens (key N: the tokens), median ms
(triton / cuda) in the comment after each entry.  Regenerate on the GPU that should decide:

    python benchmarks/gpu_bench.py --dispatch-table fastcl/ops/dispatch_table.py

Lookup (``fastcl.ops.dispatch.pick_gpu_backend``): the grid point nearest in log2 of
sqrt(N * M) and of D, among the entries for the op and dtype; DEFAULT where there is none.
"""

MEASURED_ON = 'NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, commit 275e1b9, 2026-11-28'
DEFAULT = "triton"
GRID_N = (4096, 16384, 32768)
GRID_D = (64, 256, 768, 2048)

# (op, dtype name, N, D) -> "triton" or "cuda"; N = M at every measured point.
TABLE = {
    ('masking', 'bfloat16', 4096, 64): 'cuda',  # triton 0.960 ms, cuda 0.566 ms
    ('masking', 'bfloat16', 4096, 256): 'cuda',  # triton 0.906 ms, cuda 0.655 ms
    ('masking', 'bfloat16', 4096, 768): 'cuda',  # triton 0.883 ms, cuda 0.675 ms
    ('masking', 'bfloat16', 4096, 2048): 'cuda',  # triton 1.018 ms, cuda 0.514 ms
    ('masking', 'bfloat16', 16384, 64): 'cuda',  # triton 1.135 ms, cuda 0.748 ms
    ('masking', 'bfloat16', 16384, 256): 'cuda',  # triton 1.076 ms, cuda 0.800 ms
    ('masking', 'bfloat16', 16384, 768): 'cuda',  # triton 1.048 ms, cuda 0.431 ms
    ('masking', 'bfloat16', 16384, 2048): 'cuda',  # triton 1.089 ms, cuda 0.579 ms
    ('masking', 'bfloat16', 32768, 64): 'cuda',  # triton 1.084 ms, cuda 0.745 ms
    ('masking', 'bfloat16', 32768, 256): 'cuda',  # triton 0.950 ms, cuda 0.587 ms
    ('masking', 'bfloat16', 32768, 768): 'cuda',  # triton 1.006 ms, cuda 0.354 ms
    ('masking', 'bfloat16', 32768, 2048): 'cuda',  # triton 1.005 ms, cuda 0.398 ms
    ('masking', 'float32', 4096, 64): 'cuda',  # triton 0.861 ms, cuda 0.645 ms
    ('masking', 'float32', 4096, 256): 'cuda',  # triton 0.770 ms, cuda 0.376 ms
    ('masking', 'float32', 4096, 768): 'cuda',  # triton 1.016 ms, cuda 0.662 ms
    ('masking', 'float32', 4096, 2048): 'cuda',  # triton 0.986 ms, cuda 0.604 ms
    ('masking', 'float32', 16384, 64): 'cuda',  # triton 1.020 ms, cuda 0.632 ms
    ('masking', 'float32', 16384, 256): 'cuda',  # triton 1.042 ms, cuda 0.714 ms
    ('masking', 'float32', 16384, 768): 'cuda',  # triton 1.038 ms, cuda 0.724 ms
    ('masking', 'float32', 16384, 2048): 'cuda',  # triton 1.017 ms, cuda 0.445 ms
    ('masking', 'float32', 32768, 64): 'cuda',  # triton 0.744 ms, cuda 0.431 ms
    ('masking', 'float32', 32768, 256): 'cuda',  # triton 0.702 ms, cuda 0.382 ms
    ('masking', 'float32', 32768, 768): 'cuda',  # triton 0.652 ms, cuda 0.381 ms
    ('masking', 'float32', 32768, 2048): 'cuda',  # triton 0.908 ms, cuda 0.582 ms
    ('sigmoid_pair', 'bfloat16', 4096, 64): 'triton',  # triton 1.546 ms, cuda 2.517 ms
    ('sigmoid_pair', 'bfloat16', 4096, 256): 'triton',  # triton 1.651 ms, cuda 2.602 ms
    ('sigmoid_pair', 'bfloat16', 4096, 768): 'triton',  # triton 2.198 ms, cuda 2.783 ms
    ('sigmoid_pair', 'bfloat16', 4096, 2048): 'triton',  # triton 3.112 ms, cuda 3.065 ms
    ('sigmoid_pair', 'bfloat16', 16384, 64): 'triton',  # triton 1.945 ms, cuda 7.846 ms
    ('sigmoid_pair', 'bfloat16', 16384, 256): 'triton',  # triton 3.615 ms, cuda 8.371 ms
    ('sigmoid_pair', 'bfloat16', 16384, 768): 'triton',  # triton 6.939 ms, cuda 10.211 ms
    ('sigmoid_pair', 'bfloat16', 16384, 2048): 'triton',  # triton 16.643 ms, cuda 19.473 ms
    ('sigmoid_pair', 'bfloat16', 32768, 64): 'triton',  # triton 3.905 ms, cuda 33.601 ms
    ('sigmoid_pair', 'bfloat16', 32768, 256): 'triton',  # triton 13.957 ms, cuda 27.796 ms
    ('sigmoid_pair', 'bfloat16', 32768, 768): 'triton',  # triton 23.450 ms, cuda 39.473 ms
    ('sigmoid_pair', 'bfloat16', 32768, 2048): 'cuda',  # triton 84.952 ms, cuda 49.597 ms
    ('sigmoid_pair', 'float32', 4096, 64): 'cuda',  # triton 2.683 ms, cuda 2.342 ms
    ('sigmoid_pair', 'float32', 4096, 256): 'triton',  # triton 2.707 ms, cuda 2.890 ms
    ('sigmoid_pair', 'float32', 4096, 768): 'cuda',  # triton 5.425 ms, cuda 2.746 ms
    ('sigmoid_pair', 'float32', 4096, 2048): 'cuda',  # triton 13.491 ms, cuda 5.782 ms
    ('sigmoid_pair', 'float32', 16384, 64): 'cuda',  # triton 8.972 ms, cuda 6.852 ms
    ('sigmoid_pair', 'float32', 16384, 256): 'cuda',  # triton 28.961 ms, cuda 15.798 ms
    ('sigmoid_pair', 'float32', 16384, 768): 'cuda',  # triton 82.134 ms, cuda 38.851 ms
    ('sigmoid_pair', 'float32', 16384, 2048): 'cuda',  # triton 214.726 ms, cuda 91.557 ms
    ('sigmoid_pair', 'float32', 32768, 64): 'cuda',  # triton 36.869 ms, cuda 31.264 ms
    ('sigmoid_pair', 'float32', 32768, 256): 'cuda',  # triton 118.447 ms, cuda 69.736 ms
    ('sigmoid_pair', 'float32', 32768, 768): 'cuda',  # triton 334.191 ms, cuda 161.508 ms
    ('sigmoid_pair', 'float32', 32768, 2048): 'cuda',  # triton 858.250 ms, cuda 368.458 ms
    ('similarity_lse', 'bfloat16', 4096, 64): 'triton',  # triton 2.314 ms, cuda 2.540 ms
    ('similarity_lse', 'bfloat16', 4096, 256): 'triton',  # triton 2.111 ms, cuda 2.349 ms
    ('similarity_lse', 'bfloat16', 4096, 768): 'cuda',  # triton 2.885 ms, cuda 2.621 ms
    ('similarity_lse', 'bfloat16', 4096, 2048): 'cuda',  # triton 3.289 ms, cuda 2.814 ms
    ('similarity_lse', 'bfloat16', 16384, 64): 'triton',  # triton 4.658 ms, cuda 7.084 ms
    ('similarity_lse', 'bfloat16', 16384, 256): 'triton',  # triton 4.220 ms, cuda 8.343 ms
    ('similarity_lse', 'bfloat16', 16384, 768): 'triton',  # triton 6.032 ms, cuda 8.574 ms
    ('similarity_lse', 'bfloat16', 16384, 2048): 'triton',  # triton 12.329 ms, cuda 14.904 ms
    ('similarity_lse', 'bfloat16', 32768, 64): 'triton',  # triton 10.222 ms, cuda 21.371 ms
    ('similarity_lse', 'bfloat16', 32768, 256): 'triton',  # triton 11.007 ms, cuda 22.839 ms
    ('similarity_lse', 'bfloat16', 32768, 768): 'triton',  # triton 17.743 ms, cuda 28.582 ms
    ('similarity_lse', 'bfloat16', 32768, 2048): 'triton',  # triton 46.348 ms, cuda 49.119 ms
    ('similarity_lse', 'float32', 4096, 64): 'cuda',  # triton 3.039 ms, cuda 2.427 ms
    ('similarity_lse', 'float32', 4096, 256): 'cuda',  # triton 3.096 ms, cuda 2.483 ms
    ('similarity_lse', 'float32', 4096, 768): 'cuda',  # triton 5.412 ms, cuda 2.670 ms
    ('similarity_lse', 'float32', 4096, 2048): 'cuda',  # triton 13.363 ms, cuda 5.888 ms
    ('similarity_lse', 'float32', 16384, 64): 'cuda',  # triton 8.959 ms, cuda 7.079 ms
    ('similarity_lse', 'float32', 16384, 256): 'cuda',  # triton 28.747 ms, cuda 16.061 ms
    ('similarity_lse', 'float32', 16384, 768): 'cuda',  # triton 81.210 ms, cuda 39.145 ms
    ('similarity_lse', 'float32', 16384, 2048): 'cuda',  # triton 211.524 ms, cuda 91.497 ms
    ('similarity_lse', 'float32', 32768, 64): 'cuda',  # triton 36.771 ms, cuda 28.445 ms
    ('similarity_lse', 'float32', 32768, 256): 'cuda',  # triton 117.601 ms, cuda 67.151 ms
    ('similarity_lse', 'float32', 32768, 768): 'cuda',  # triton 329.975 ms, cuda 158.770 ms
    ('similarity_lse', 'float32', 32768, 2048): 'cuda',  # triton 845.063 ms, cuda 364.694 ms
}
