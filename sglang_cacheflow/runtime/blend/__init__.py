"""Chunk reuse beyond exact prefixes (CacheBlend, CacheTune) on the reference runtime.

A chunk's KV is computed alone (after a fixed preamble) and stored with per-token scores
(:mod:`sglang_cacheflow.blend.store`); at reuse its keys are moved to the new position
(:mod:`sglang_cacheflow.blend.rope`), a share of its tokens is chosen
(:mod:`sglang_cacheflow.blend.selection`) and recomputed with the query through every layer
while the others' KV loads layer by layer (:mod:`sglang_cacheflow.blend.loader`,
:mod:`.restore`). The ratio comes from :func:`sglang_cacheflow.planner.plan_blend`.
docs/design.md "Chunk reuse" has the why.
"""
