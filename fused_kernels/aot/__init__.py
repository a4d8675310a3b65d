"""``python -m fused_kernels.aot``: compile every kernel configuration the launchers can choose, ahead of time
for real GPUs (by default sm_80 and sm_90a; ``--arch all``: every architecture family of the tile table,
NVIDIA sm_70 to sm_120 and AMD gfx90a / gfx942 / gfx1100, docs/architectures.md), on a machine without one,
and check registers, spills and shared memory.

    python -m fused_kernels.aot [--arch 80 90 | all | 75 120 gfx942 ...] [--json PATH] [--family NAME ...]
                                [--filter SUBSTRING ...] [--jobs N] [--quick] [--sass]

Each configuration goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
with the specialization the runtime launcher would give a typical contiguous call: pointers aligned
to 16 bytes and integer arguments divisible by 16 carry ``tt.divisibility=16``, integers equal to 1
(a unit last-dim stride, a collapsed leading dim of size 1) become constants, floats stay ``fp32``
(``specialize.py``, the same rules as ``triton.runtime.jit``; where this triton exposes its own
argument binder the result is cross-checked against it). Registers and spill bytes come from the
``ptxas -v`` log of the PTX (the ptxas bundled with triton, ``--gpu-name=sm_80`` / ``sm_90a``): the
run triton itself makes to build the cubin, printed with ``TRITON_DUMP_PTXAS_LOG=1`` and captured, so
the numbers are those of the real cubin with triton's own extra flags (triton 3.9 adds
``--regAllocOptLevel=2`` and uses the CUDA 13 ptxas for sm_90a, which spill where a plain
``ptxas -v`` does not); on a cache hit, where no ptxas ran, ``ptxas -v`` is run on the PTX here. Shared
memory comes from the compiled kernel's metadata, and the static count of tensor-core instructions
(``mma.sync``, ``wgmma.mma_async``) from the PTX. Exit code 1 if any
configuration fails to compile, spills, needs more shared memory than a block may have (sm_80: 163 KB,
sm_90: 227 KB, the CUDA per-block opt-in limits the runtime checks at launch), or, for a kernel built
on ``tl.dot``, has no tensor-core instruction.

Other architectures (``--arch``, ``_core.launch.ARCH_FAMILIES``): each compiles the configurations the launchers
pick for it (its column of the tile table) and is judged against its family's limits (shared memory / LDS per
block; tensor-core instructions only where the family has them for the dtype: none below sm_80). AMD targets
(``GPUTarget("hip", "gfx942", 64)``, ...) compile to a code object whose metadata gives VGPRs / AGPRs, spilled
registers, scratch and LDS (``compile.parse_amdgcn``), and the assembly's MFMA / WMMA count; their pointers also
carry ``tt.pointer_range=32``, as triton's AMD launcher specializes a tensor under 2 GB.

How the configurations are enumerated (one spec generator per kernel family, in ``FAMILIES``):

- Block sizes come from the launchers' own choice, never from numbers copied here: the row lengths
  ``n = 1, 2, 4, ...`` (and the largest ``n`` the single-block path takes) are run through the
  launcher's block choice (``ops.norms._block`` with ``ops.norms.fused_limit``; for
  softmax ``softmax.launch_rows`` itself, handed a recorder instead of the kernel) until the
  multi-pass path is reached. That yields every power-of-two ``BLOCK_N`` up to the single-block limit
  plus ``MULTIPASS_BLOCK``, each with its ``num_warps`` (``_core.launch.row_warps``). The row length kept
  for a block is ``n = BLOCK_N`` (a typical size, divisible by 16 from 16 up; sizes 1 to 8 specialize
  as such), the largest single-block ``n`` if the limit is not a power of two, and the first power of
  two past the limit for the multi-pass path.
- Every dtype the ops accept (fp16, bf16, fp32, fp64); the accumulator constexpr ``ACC`` follows it
  (``_core.launch.acc_dtype``) and fp64 halves the single-block limit inside the launchers.
- The constexpr feature switches at their heaviest and at their plainest. Every switch only adds
  loads, arithmetic and live values, so "all on" bounds registers and shared memory from above, and
  "all off" is the plain default call:
  LayerNorm forward: residual + dropout + weight + bias (float32 parameters with half inputs, the
  widest mixed precision the op accepts), LayerNorm not RMSNorm; or none of them.
  LayerNorm backward: weight + bias + gradient into residual_out + dropout + stored dresidual; or none.
  Softmax forward: no mask; bool mask + causal; float mask (input dtype) + causal. Softmax backward
  has no switches.
- Launch arguments are those of a typical call: contiguous ``(M, N)`` rows for LayerNorm (the
  backward's ``rows_per_program`` as for 8192 rows on 432 programs, 4 per SM of an A100), and for
  softmax 4-D ``(B, H, L, N)`` inputs laid out by the launcher (a padding mask ``(B, 1, 1, N)`` for
  the bool mask, a per-query mask ``(B, 1, L, N)`` for the float one, ``L = N`` when causal).
- Attention: see ``attention_specs``; the paged KV cache: ``paged_specs``; packed variable-length attention:
  ``varlen_specs``; the attention variants (windows, ALiBi, softcap, documents, prefix-LM, score and mask mods):
  ``variants_specs``.

- Launches split over long grids (``_core.launch.split_grid``: more than 65,535 programs on grid axis 1 or 2)
  compile each kernel once more with ``GRID_SPLIT=True``: ``specs.grid_split_twins`` adds, per kernel, arch,
  dtype and feature set, the heaviest configuration in that form (config suffix ``grid-split``).

To add a kernel family, write one generator yielding ``Spec`` objects and append it to ``FAMILIES``;
set ``tensor_cores=True`` on specs whose kernel must use tensor cores (``tl.dot``).

It must not run in a process with ``TRITON_INTERPRET=1`` (the ``jit`` decorators read it at import):
when that variable is set the command re-executes itself without it. ``TRITON_CACHE_DIR`` points at
a temporary directory unless it is already set.
"""
