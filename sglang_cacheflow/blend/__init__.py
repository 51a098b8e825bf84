"""Chunk reuse beyond exact prefixes (CacheBlend, CacheTune): the parts both engines share.

The chunk store in the tiers (:mod:`.store`), the RoPE fix-up that moves a chunk's keys to
a new position (:mod:`.rope`), the token scores that choose what to recompute
(:mod:`.selection`) and the reader that lands a prompt's chunk KV layer by layer beside its
forward (:mod:`.loader`). The engines run them: the reference runtime
(:mod:`sglang_cacheflow.runtime.blend`) and SGLang (:mod:`sglang_cacheflow.sglang.blend`).
"""
