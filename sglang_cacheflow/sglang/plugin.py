"""Entry point of group ``sglang.srt.plugins``: SGLang calls :func:`load` in every process.

SGLang's launcher, engine, scheduler and detokenizer each call
``sglang.srt.plugins.load_plugins()`` early; that calls :func:`load`. This module
imports nothing heavy, so a process that needs nothing from the package pays
nothing for it.
"""

from __future__ import annotations


def load() -> None:
    """Install what this process needs.

    On SGLang's CPU engine without a real ``sgl_kernel`` (a CPU-only machine),
    install the CPU kernels, HiCache host transfers, host allocator and the
    ``cacheflow_cpu`` attention backend (:mod:`sglang_cacheflow.sglang.cpu.install`).
    On CUDA without a real ``sgl_kernel``, install its torch stand-ins
    (:mod:`sglang_cacheflow.sglang.cuda.install`). On a GPU install with
    ``sgl_kernel`` nothing is touched.

    Everywhere, install the ``--enable-cacheflow`` hooks (:mod:`sglang_cacheflow.sglang.hooks`).
    """
    from sglang_cacheflow.sglang.cpu.install import install
    from sglang_cacheflow.sglang.cuda.install import install as install_cuda

    install() or install_cuda()

    from sglang_cacheflow.sglang.hooks import install as install_cacheflow

    install_cacheflow()
