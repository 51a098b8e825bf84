"""SGLang 0.5.23 on a CPU-only machine: what its CPU engine lacks, in plain torch.

Installed into every SGLang process by the plugin entry point
(:mod:`sglang_cacheflow.sglang.plugin`) when SGLang runs its CPU engine and no
real ``sgl_kernel`` is importable; never on a GPU install.

- :mod:`.kernels`: the ``sgl_kernel`` ops of the KV pool (cache move, req->token).
- :mod:`.speculative`: the ``sgl_kernel`` ops of EAGLE speculative decoding.
- :mod:`.transfer`: HiCache host <-> device transfers (``sgl_kernel.kvcacheio``).
- :mod:`.allocator`: host KV buffers without CUDA pinning.
- :mod:`.attention`: the ``cacheflow_cpu`` attention backend.
- :mod:`.memory`: byte views of raw KV memory, shared by the ops above.
- :mod:`.install`: puts all of the above in place; :mod:`.imports` and
  :mod:`.processes` are how (bind on import, spawn entry points).
- :mod:`.faults`: test-only fault injection (corrupt host -> device loads).
"""
