"""Hook-up of ``--enable-cacheflow`` into SGLang 0.5.23, installed by the plugin entry point.

:func:`install` (called from :func:`sglang_cacheflow.sglang.plugin.load` in every SGLang
process) does, lazily (each when SGLang imports the module concerned):

- launcher: handles ``--enable-cacheflow`` / ``--cacheflow-policy`` / ``--cacheflow-config``
  in ``sys.argv`` when SGLang has no native fields for them
  (:func:`sglang_cacheflow.sglang.flags.handle_launcher_argv`);
- ``sglang.srt.mem_cache.registry``: registers the radix cache backend ``cacheflow``;
- ``sglang.srt.managers.scheduler``: wraps ``Scheduler.process_input_requests`` (arrivals:
  a burst gathered on an idle scheduler, batch-planned L3 prefetches),
  ``Scheduler._add_request_to_queue`` (a request's own settings in its ``custom_params``),
  ``Scheduler._get_new_batch_prefill_raw`` (admission: batch-planned host hits) and
  ``Scheduler.stash_chunked_request`` (a split restore's front is checkpointed: splice its
  loaded back in);
- ``sglang.srt.managers.schedule_policy``: wraps ``PrefillAdder._select_prefill_admission``
  and ``PrefillAdder.add_chunked_req`` so that a split restore's first chunk ends where its
  recomputed front ends (one chunked request at a time, as SGLang runs them);
- ``sglang.srt.managers.tp_worker``: times ``TpModelWorker.forward_batch_generation`` (extend
  forwards calibrate the compute cost; the end of a request's first forward ends its restore);
- ``sglang.srt.managers.cache_controller``: times ``HiCacheController.start_loading``
  (host-to-device loads calibrate the host tier).

Every wrapper passes straight through unless the process runs a
:class:`~sglang_cacheflow.sglang.radix_cache.CacheFlowRadixCache`; a failure inside the
controller's bookkeeping is logged and never fails the scheduler.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sglang_cacheflow.sglang.arrivals import gather_burst
from sglang_cacheflow.sglang.layer_clock import layer_clock
from sglang_cacheflow.sglang.one_forward import Narrowed

__all__ = ["create_cacheflow_cache", "install"]

logger = logging.getLogger("sglang_cacheflow.sglang")

_lock = threading.Lock()
_installed = False


def _ctl() -> Any:
    from sglang_cacheflow.sglang.controller import current_controller

    return current_controller()


def create_cacheflow_cache(ctx: Any) -> Any:
    """Radix cache factory of ``--radix-cache-backend cacheflow``."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    from sglang_cacheflow.sglang.capabilities import prefill_budget
    from sglang_cacheflow.sglang.config import check_page_size
    from sglang_cacheflow.sglang.controller import CacheFlowController, set_current_controller
    from sglang_cacheflow.sglang.flags import config_from_server_args
    from sglang_cacheflow.sglang.model import model_shape
    from sglang_cacheflow.sglang.radix_cache import CacheFlowRadixCache

    cfg = config_from_server_args(ctx.server_args)
    if ctx.disable_radix_cache:
        raise ValueError(
            "--radix-cache-backend cacheflow needs the radix cache: drop --disable-radix-cache"
        )
    if not ctx.enable_hierarchical_cache:
        raise ValueError(
            "--radix-cache-backend cacheflow restores from HiCache tiers: add "
            "--enable-hierarchical-cache (--enable-cacheflow does)"
        )
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("--enable-cacheflow supports full-attention models only (no SWA/Mamba)")
    cache = create_unified_radix_cache(ctx, cache_class=CacheFlowRadixCache)
    check_page_size(cfg, cache.page_size)
    mc = ctx.model_config
    try:
        dtype_bytes = ctx.params.token_to_kv_pool_allocator.get_kvcache().dtype.itemsize
    except AttributeError:
        dtype_bytes = 2
    shape = model_shape(mc, dtype_bytes, ctx.tp_size)
    group = None
    if ctx.tp_size > 1 and ctx.tp_group is not None:
        group = getattr(ctx.tp_group, "cpu_group", ctx.tp_group)
    batch_tokens = prefill_budget(_schedule_settings(ctx.server_args))
    ctl = CacheFlowController(
        cfg,
        cache,
        shape,
        cache.page_size,
        tp_group=group,
        tp_rank=int(ctx.tp_rank),
        enable_metrics=bool(getattr(ctx.server_args, "enable_metrics", False)),
        batch_tokens=batch_tokens,
    )
    if cfg.chunk_store is not None:
        from sglang_cacheflow.sglang.blend import ChunkReuse

        if ctx.tp_size > 1:
            raise ValueError(
                "--cacheflow-config chunk_store runs on one TP rank for now: drop --tp or "
                "unset chunk_store"
            )
        model = ctx.server_args.served_model_name or ctx.server_args.model_path
        ctl.blends = ChunkReuse.create(cfg, cache, str(model), ctl.metrics)
    cache.cacheflow = ctl
    set_current_controller(ctl)
    logger.info(
        "cacheflow: policy %s, chunk %d tokens, L3 %s%s, TP %d, prefill forwards of up to %d "
        "tokens, model %s",
        cfg.policy, cfg.chunk_tokens, (cfg.redis_url and "redis") or "none",
        f" through {cfg.link}" if cfg.link else "", ctx.tp_size, batch_tokens, shape,
    )  # fmt: skip
    return cache


def _schedule_settings(server_args: Any) -> Any:
    """SGLang's resolved scheduling settings (``chunked_prefill_size``...): 0.5.23 keeps
    them in its runtime context, where the server arguments may hold the unresolved ones."""
    try:
        from sglang.srt.runtime_context import get_schedule

        return get_schedule()
    except Exception:  # another SGLang layout, or no context: the arguments as given
        return server_args


def _safe(what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        logger.exception("cacheflow: %s failed; serving continues", what)


# -- scheduler --------------------------------------------------------------------------


def _wrap_process_input_requests(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def process_input_requests(self: Any, recv_reqs: Any, *args: Any, **kwargs: Any) -> Any:
        ctl = _ctl()
        if ctl is None:
            return original(self, recv_reqs, *args, **kwargs)
        if isinstance(recv_reqs, list):
            gap_s = (ctl.cfg.arrival_gap_ms or 0.0) / 1e3
            if added := gather_burst(self, recv_reqs, gap_s, ctl.cfg.arrival_polls):
                logger.debug("cacheflow: %d more requests arrived with the first", added)
        ctl.begin_arrivals(self)
        try:
            return original(self, recv_reqs, *args, **kwargs)
        finally:
            ctl.end_arrivals()

    return process_input_requests


def _wrap_add_request_to_queue(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _add_request_to_queue(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        ctl = _ctl()
        if ctl is not None and not req.finished():  # before SGLang's L3 prefetch of it
            error = ctl.take_request_params(req)
            if error is not None:
                req.set_finish_with_abort(error)
        return original(self, req, *args, **kwargs)

    return _add_request_to_queue


def _wrap_get_new_batch_prefill_raw(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _get_new_batch_prefill_raw(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctl = _ctl()
        if ctl is None or not self.waiting_queue:
            return original(self, *args, **kwargs)
        ctl.begin_admission(self)
        result = None
        try:
            result = original(self, *args, **kwargs)
            return result
        finally:
            new_batch = result[0] if isinstance(result, tuple) else None
            ctl.end_admission(new_batch)

    return _get_new_batch_prefill_raw


def _wrap_stash_chunked_request(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stash_chunked_request(self: Any, req: Any) -> Any:
        out = original(self, req)
        ctl = _ctl()
        if ctl is not None and ctl.splits:
            ctl.after_checkpoint(req, self)
        return out

    return stash_chunked_request


def _wrap_prefetch_after_device_hit_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _prefetch_after_device_hit_loss(self: Any, req: Any) -> bool:
        ctl = _ctl()
        if ctl is not None and req.rid in ctl.host_caps:
            # The match shrank because the plan capped its host hit, not because device
            # KV was evicted: there is nothing new to look up in L3.
            req.storage_prefetch_last_match_len = req.prefix_len + req.host_hit_length
            return False
        return bool(original(self, req))

    return _prefetch_after_device_hit_loss


def _patch_scheduler(module: ModuleType) -> None:
    cls = module.Scheduler
    cls._prefetch_after_device_hit_loss = _wrap_prefetch_after_device_hit_loss(
        cls._prefetch_after_device_hit_loss
    )
    cls.process_input_requests = _wrap_process_input_requests(cls.process_input_requests)
    cls._add_request_to_queue = _wrap_add_request_to_queue(cls._add_request_to_queue)
    cls._get_new_batch_prefill_raw = _wrap_get_new_batch_prefill_raw(cls._get_new_batch_prefill_raw)
    cls.stash_chunked_request = _wrap_stash_chunked_request(cls.stash_chunked_request)


# -- split restores: the first chunk ends at the cut -------------------------------------


def _wrap_select_prefill_admission(original: Callable[..., Any], module: ModuleType) -> Any:
    admission_cls, other = module._PrefillAdmission, module.AddReqResult.OTHER

    @functools.wraps(original)
    def _select_prefill_admission(self: Any, req: Any, **kwargs: Any) -> Any:
        admission = original(self, req, **kwargs)
        ctl = _ctl()
        if ctl is None or not isinstance(admission, admission_cls):
            return admission
        if ctl.holds_back(req.rid, self.can_run_list):
            return other  # one restore per forward, in the plan's order
        if ctl.streamed and any(ctl.streaming(r) for r in self.can_run_list):
            return other  # a streamed extend runs alone: it may have to be cut back
        busy = kwargs.get("has_chunked_req") or self.new_chunked_req is not None
        if ctl.blends is not None:
            if any(ctl.blends.runs_alone(r) for r in self.can_run_list):
                return other  # a blend runs alone: it may have to be cut back
            if ctl.plan_blend(req, admission.prefix_len, admission.extend_len) is not None:
                if busy or self.can_run_list:
                    return other
                if admission.is_chunked:  # over this round's budget: served plainly
                    ctl.blends.drop(req, "unsupported")
                else:
                    ctl.blends.admit(req)
                return admission
        if not ctl.splits:
            return admission
        if any(ctl.runs_alone(r) for r in self.can_run_list):
            return other  # a layer split's chunk, a split's one forward run alone
        sp = ctl.split_of(req.rid)
        start = admission.prefix_len
        if sp is not None and sp.loads_front:  # its extend streams: it runs alone
            return other if busy or self.can_run_list else admission
        if sp is None or not start < sp.cut < start + admission.extend_len:
            return admission
        if sp.layer_split or sp.one_forward:  # a layer split's chunk, a split's one forward
            if sp.layer_split and start != sp.start:  # the span moved (its front got cached)
                ctl.drop_split(req.rid, "split_cut_missed")
                return admission
            if busy or self.can_run_list:
                return other  # either runs alone
            # the span and the new tokens in one forward (one_forward), or over this round's
            # budget a chunk and then the extend
            sp.one_forward = sp.one_forward and not admission.is_chunked
            if sp.one_forward or sp.layer_split:
                # its loaded part is not in yet: keep it out of the tree until it is
                sp.skip_insert, req.skip_radix_cache_insert = req.skip_radix_cache_insert, True
            if sp.one_forward:
                return admission
        elif busy:
            return other  # SGLang runs one chunked request at a time: wait for it
        return admission_cls(start, sp.cut - start, 0, True, admission.replay_len)

    return _select_prefill_admission


def _wrap_commit_prefill_admission(original: Callable[..., Any], module: ModuleType) -> Any:
    admission_cls, clip = module._PrefillAdmission, module.CLIP_MAX_NEW_TOKENS

    @functools.wraps(original)
    def _commit_prefill_admission(self: Any, req: Any, admission: Any, *args: Any) -> Any:
        ctl = _ctl()
        loaded = 0
        if ctl is not None and ctl.splits and ctl.front_load(req.rid) is not None:
            loaded = ctl.admit_front_load(req, admission.prefix_len)
        if loaded:  # the extend starts after the loaded front, as after a host load-back
            prefix = admission.prefix_len + loaded
            extend = min(admission.extend_len, len(req.full_untruncated_fill_ids) - prefix)
            chunked = admission.is_chunked and prefix + extend < len(req.full_untruncated_fill_ids)
            max_new = admission.max_new_tokens
            if admission.is_chunked and not chunked:
                max_new = min(req.sampling_params.max_new_tokens, clip)
            req.prefix_len = prefix
            admission = admission_cls(
                prefix, extend, max_new, chunked, self._replay_len(req, prefix)
            )
        return original(self, req, admission, *args)

    return _commit_prefill_admission


def _wrap_add_chunked_req(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_chunked_req(self: Any, req: Any) -> Any:
        ctl = _ctl()
        sp = ctl.split_of(req.rid) if ctl is not None and ctl.splits else None
        if sp is not None and req.prefix_len < sp.cut:  # a long front takes several chunks
            limit = sp.cut - req.prefix_len
            self.chunked_req_limit = min(self.chunked_req_limit or limit, limit)
        return original(self, req)

    return add_chunked_req


def _patch_schedule_policy(module: ModuleType) -> None:
    cls = module.PrefillAdder
    cls._select_prefill_admission = _wrap_select_prefill_admission(
        cls._select_prefill_admission, module
    )
    cls.add_chunked_req = _wrap_add_chunked_req(cls.add_chunked_req)
    cls._commit_prefill_admission = _wrap_commit_prefill_admission(
        cls._commit_prefill_admission, module
    )


# -- timings ----------------------------------------------------------------------------


def _layer_stack(worker: Any) -> Any:
    """The module whose ``end_layer`` bounds the model's layer loop (SGLang's Llama, Qwen2/3,
    Mistral... all keep one for pipeline parallelism), or None."""
    model = getattr(getattr(worker, "model_runner", None), "model", None)
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "end_layer") and hasattr(inner, "layers") else None


def _wrap_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward_batch_generation(self: Any, batch: Any = None, *args: Any, **kwargs: Any) -> Any:
        ctl = _ctl()
        if ctl is None or batch is None or not hasattr(batch, "reqs"):
            return original(self, batch, *args, **kwargs)
        # A layer split's first chunk: run the span through its bottom layers only.
        top = ctl.layer_chunk_of(batch) if ctl.splits else None
        stack = _layer_stack(self)
        limited = stack is not None and top is not None
        saved = stack.end_layer if limited else None
        if limited:
            stack.end_layer = stack.start_layer + top
        # A split in one forward: the span's loaded part leaves it at its first loaded layer
        # (where the layer loop cannot be hooked it goes on through every layer, the loaded
        # part computed and then overwritten with the loaded KV: slower, not wrong).
        one = ctl.begin_one_forward(batch) if ctl.splits else None
        # A blend: the loaded tokens leave before layer 0, their KV loads layer by layer.
        blend = None
        if one is None and ctl.blends is not None:
            blend = ctl.blends.begin(batch, self, stack)
            one = (0, blend.drop) if blend is not None else None
        switch = Narrowed(stack, *one) if one is not None and stack is not None else None
        clock = layer_clock(stack, getattr(getattr(self, "model_runner", None), "device", None))
        if clock is not None:
            clock.reset()
        start = time.perf_counter()
        try:
            out = original(self, batch, *args, **kwargs)
        finally:
            if limited:
                stack.end_layer = saved
            if switch is not None:
                switch.remove()
        elapsed = time.perf_counter() - start
        outside = clock.outside(elapsed) if clock is not None else None
        if switch is not None and switch.switched_at is not None and blend is None:
            bottom = switch.switched_at - start
            _safe("bottom layers timing", lambda: ctl.one_forward_done(batch, bottom, start))
        # Not under _safe: a stream that did not land must cut its request back, or fail;
        # so must a blend (it waited for loads too: it calibrates no compute either).
        streamed = ctl.finish_streams(batch) if ctl.streamed else None
        if blend is not None:
            streamed = {**(streamed or {}), **ctl.blends.finish(batch, ctl.scheduler)}
        if ctl.blends is not None and batch.forward_mode.is_extend():
            _safe("chunk store", lambda: ctl.blends.fill(batch))
        _safe(
            "forward bookkeeping",
            lambda: ctl.forward_done(batch, elapsed, top, start, streamed, outside),
        )
        return out

    return forward_batch_generation


def _patch_tp_worker(module: ModuleType) -> None:
    cls = module.TpModelWorker
    cls.forward_batch_generation = _wrap_forward(cls.forward_batch_generation)


def _wrap_start_loading(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def start_loading(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctl = _ctl()
        if ctl is None or not self.load_queue:
            return original(self, *args, **kwargs)
        tokens = sum(len(op.device_indices) for op in self.load_queue)
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        elapsed = time.perf_counter() - start
        from sglang_cacheflow.tiers.names import HOST_TIER

        nbytes = tokens * ctl.shape.kv_bytes_per_token
        _safe(
            "host transfer timing", lambda: ctl.costs.observe_transfer(HOST_TIER, nbytes, elapsed)
        )
        return out

    return start_loading


def _patch_cache_controller(module: ModuleType) -> None:
    cls = module.HiCacheController
    cls.start_loading = _wrap_start_loading(cls.start_loading)


def _register_backend(module: ModuleType) -> None:
    from sglang_cacheflow.sglang.flags import BACKEND_NAME

    if module.get_radix_cache_factory(BACKEND_NAME) is None:
        module.register_radix_cache_backend(BACKEND_NAME, create_cacheflow_cache)


def install() -> None:
    """Install the hooks above into this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    from sglang_cacheflow.sglang.cpu.imports import when_imported
    from sglang_cacheflow.sglang.flags import handle_launcher_argv

    handle_launcher_argv()
    when_imported("sglang.srt.mem_cache.registry", _register_backend)
    when_imported("sglang.srt.managers.scheduler", _patch_scheduler)
    when_imported("sglang.srt.managers.schedule_policy", _patch_schedule_policy)
    when_imported("sglang.srt.managers.tp_worker", _patch_tp_worker)
    when_imported("sglang.srt.managers.cache_controller", _patch_cache_controller)
