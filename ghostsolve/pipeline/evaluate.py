"""Perplexity and the lm-evaluation-harness bridge.

Perplexity follows the convention of the layer-pruning peers: the text is tokenized once and cut into
non-overlapping windows of ``seq_len`` tokens (BOS first in each window where the tokenizer has one; see
:func:`ghostsolve.pipeline.data.text_windows`); every token after the first of each window is predicted
from the tokens before it in the same window; perplexity is ``exp`` of the mean negative log-likelihood
over all predicted tokens of all windows. Windows never see each other, so the number is independent of
the batch size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.batches import CalibrationBatch, as_batches, eval_mode
from ghostsolve.pipeline.model.devices import model_input_device
from ghostsolve.pipeline.progress import progress_bar

__all__ = [
    "Perplexity",
    "default_seq_len",
    "lm_eval_tasks",
    "logits_of",
    "mean_nll",
    "perplexity",
    "shifted_nll",
]

logger = logging.getLogger(__name__)

# The peers evaluate at 2048 tokens; models with shorter context get their own maximum.
MAX_DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class Perplexity:
    """Result of :func:`perplexity`.

    Attributes
    ----------
    perplexity : float
        ``exp(nll)``.
    nll : float
        Mean negative log-likelihood per predicted token, in nats (accumulated in fp64).
    n_tokens : int
        Predicted tokens: ``n_windows * (seq_len - 1)`` for unpadded windows.
    n_windows : int
    seq_len : int
    """

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int


def default_seq_len(model_or_config: Any) -> int:
    """``min(2048, max_position_embeddings)`` of a model or config (2048 when the config has none)."""
    config = getattr(model_or_config, "config", model_or_config)
    max_positions = getattr(config, "max_position_embeddings", None)
    return min(MAX_DEFAULT_SEQ_LEN, int(max_positions)) if max_positions else MAX_DEFAULT_SEQ_LEN


def shifted_nll(logits: torch.Tensor, batch: CalibrationBatch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of one batch (fp64 scalar, keeps the autograd graph) and the predicted count.

    Position ``t`` predicts token ``t + 1``; a target counts only when both it and its context are real
    (unmasked). Logits of any dtype are upcast to fp32 for the log-softmax; the sum is formed in fp64.
    """
    ids = batch.input_ids.to(logits.device)
    real = batch.real().to(logits.device)
    valid = real[:, 1:] & real[:, :-1]
    pred = logits[:, :-1, :].float()
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll[valid.reshape(-1)].double().sum(), int(valid.sum())


def logits_of(model: Any, batch: CalibrationBatch) -> torch.Tensor:
    """Logits ``(batch, seq, vocab)`` of one batch, inputs on the model's input device.

    A transformers model (one with a ``config``) is told not to build a KV cache, which a single forward
    never reads; any other module is called with the ids and the mask only.
    """
    extra = {"use_cache": False} if hasattr(model, "config") else {}
    inputs = batch.model_inputs(model_input_device(model))
    return model(**inputs, **extra).logits  # type: ignore[no-any-return]


@torch.no_grad()
def mean_nll(
    model: Any, batches: Iterable[Any], *, progress: bool = False, desc: str = "perplexity"
) -> tuple[float, int]:
    """Mean next-token NLL (nats) over every predicted token of ``batches``, and the number of tokens.

    The one routine behind :func:`perplexity` and the selection rules' calibration perplexity. The model runs
    in eval mode (each module's flag restored afterwards).

    Raises
    ------
    GhostsolveError
        Malformed batches, or no predicted token at all (every window shorter than 2 real tokens).
    """
    parsed = as_batches(batches)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model):
        for batch in progress_bar(parsed, progress, desc):
            nll, n = shifted_nll(logits_of(model, batch), batch)
            total += nll.cpu()
            count += n
    if count == 0:
        raise GhostsolveError(
            "no token was predicted (every window is padding, or has fewer than 2 real tokens); check the "
            "attention mask or use longer sequences"
        )
    return float(total) / count, count


def perplexity(
    model: Any,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of ``model`` on token windows.

    Parameters
    ----------
    model : causal LM
        Called as ``model(input_ids=..., attention_mask=...)``, returning an object with ``.logits`` of shape
        ``(batch, seq_len, vocab)``. Run in eval mode on its own device.
    windows : (n_windows, seq_len) torch.long
        Token windows, e.g. from :func:`ghostsolve.pipeline.data.text_windows`.
    batch_size : int
        Windows per forward pass (does not change the result).
    attention_mask : (n_windows, seq_len), optional
        1 for real tokens, 0 for padding; a padded position is neither predicted nor counted.
    progress : bool
        Show a tqdm bar.
    desc : str
        Progress bar label.

    Returns
    -------
    Perplexity

    Raises
    ------
    GhostsolveError
        If ``windows`` is not a non-empty 2-D integer tensor with ``seq_len >= 2``, the mask's shape differs,
        ``batch_size < 1``, no token is predicted, or the model's loss is not finite.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise GhostsolveError(
            f"windows have shape {tuple(windows.shape)}; expected (n_windows >= 1, seq_len >= 2)"
        )
    if windows.dtype not in (torch.long, torch.int32, torch.int64):
        raise GhostsolveError(f"windows have dtype {windows.dtype}; expected token ids (torch.long)")
    if attention_mask is not None and attention_mask.shape != windows.shape:
        raise GhostsolveError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but windows have "
            f"{tuple(windows.shape)}; they must match"
        )
    if batch_size < 1:
        raise GhostsolveError(f"batch_size is {batch_size}; give a positive number")
    ids = windows.to(torch.long)
    # An explicit all-ones mask where none is given: the model sees the same call for every window.
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    masks = mask.split(batch_size)
    batches = [CalibrationBatch(c, m) for c, m in zip(ids.split(batch_size), masks, strict=True)]
    nll_mean, n_tokens = mean_nll(model, batches, progress=progress, desc=desc)
    if not math.isfinite(nll_mean):
        raise GhostsolveError(
            f"the mean NLL is {nll_mean} over {n_tokens} tokens: the model produced non-finite logits; "
            "evaluate in float32 (--dtype float32)"
        )
    return Perplexity(
        perplexity=math.exp(nll_mean) if nll_mean < 700 else math.inf,
        nll=nll_mean,
        n_tokens=n_tokens,
        n_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
    )


def lm_eval_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness tasks on an in-memory model through its ``HFLM`` wrapper.

    The model is not reloaded from disk: the recovered (ghosted) model is evaluated as it is in memory.
    lm-eval is imported here, lazily; install it with ``pip install 'ghostsolve[eval]'``.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : transformers tokenizer
    tasks : sequence of str
        Task names, e.g. ``["arc_easy", "hellaswag"]``, or names of tasks under ``include_path``.
    batch_size : int
    num_fewshot : int, optional
    limit : int or float, optional
        Examples per task (a float < 1 is a fraction), for quick runs.
    include_path : str, optional
        Folder of extra task YAML files (local tasks, e.g. offline).
    max_length : int, optional
        Context length given to HFLM (default: the model's).

    Returns
    -------
    dict
        ``{task: {metric: value}}`` as lm-eval reports them (``results`` of ``simple_evaluate``).

    Raises
    ------
    GhostsolveError
        If lm-eval is not installed, ``tasks`` is empty, or a task is unknown.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise GhostsolveError(
            f"lm-evaluation-harness is not installed ({exc}); install the evaluation extra with "
            "pip install 'ghostsolve[eval]'"
        ) from exc
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise GhostsolveError("no lm-eval task given; pass task names such as arc_easy,hellaswag")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise GhostsolveError(
            f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks`, or give --include-path with "
            "the folder of their YAML files"
        )
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    if output is None:  # simple_evaluate returns None on non-zero ranks
        return {}
    return {task: dict(metrics) for task, metrics in output["results"].items()}
