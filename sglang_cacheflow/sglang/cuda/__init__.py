"""SGLang 0.5.23 on a CUDA machine without ``sgl_kernel``: its imports, in plain torch.

SGLang's CUDA path imports about a dozen ``sgl_kernel`` names at module level
(activations, norms, sampler renormalisation, HiCache transfers, a PDL probe).
When no real ``sgl_kernel`` wheel matches the machine's torch, these stand-ins
let the server run with ``SGLANG_FORCE_FUSED_OP_BACKEND=torch`` (layers take
their ``forward_native`` path), ``--attention-backend triton``,
``--sampling-backend pytorch`` and ``--hicache-io-backend direct``.

- :mod:`.kernels`: the ops, with torch bodies and the CUDA ops' signatures.
- :mod:`.install`: registers them as ``sgl_kernel`` when SGLang runs on CUDA and
  no real ``sgl_kernel`` is importable; never anywhere else.
"""
