"""Folds of published recovery maps into a model's ordinary weights (no extra module).

* **Prune&Comp** (scalar magnitude compensation): the stream entering the first kept layer after a
  cut is multiplied by ``α``. In a pre-norm model the stream is the sum of the token embedding and
  every o_proj / down_proj output written so far, and each sublayer reads it through a norm that
  ignores its scale, so multiplying the embedding and every o_proj/down_proj *before the cut* by ``α``
  multiplies the stream there by ``α`` (exactly up to the norms' epsilon). A tied lm_head is scaled
  with the embedding; the final norm's weight (and bias) is scaled by ``1/α`` to compensate, which is
  exact because the lm_head is linear in the final norm's output: ``(n/α)(α E)ᵀ = n Eᵀ``. So the
  checkpoint stays tied and no lm_head copy is made (an untied copy would cost vocab × hidden weights,
  ≈1 GB in bf16 for a Llama-3-8B-sized vocabulary). In a post-norm model (OLMo-2) the sublayer outputs
  pass through a norm before the addition, which cancels the scale: the fold is refused there.
* **ReplaceMe** (linear map on an MLP output): ``m ↦ m T`` applied to the MLP output of the last kept
  layer before the cut, folded into its down_proj: ``m T = a W_downᵀ T + b T``, so
  ``W_down ← Tᵀ W_down`` and ``b ← b T``. In a post-norm model a norm sits between down_proj and the
  residual addition, so the fold would not be exact: refused.

Row-vector convention throughout: a hidden state is a row ``h``, a map acts as ``h W``.
"""

from __future__ import annotations

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError

__all__ = ["fold_prune_comp", "fold_replaceme", "require_pre_norm", "untie_embeddings"]


def require_pre_norm(adapter: ModelAdapter, method: str) -> None:
    """Refuse ``method`` (a weight fold) on a post-norm architecture.

    Raises
    ------
    GhostsolveError
        If ``adapter.norm_placement`` is not ``"pre"``.
    """
    if not adapter.is_pre_norm:
        raise GhostsolveError(
            f"{method} folds into o_proj/down_proj weights, which is only valid for pre-norm models; "
            f"{adapter.family} (model_type {adapter.model_type!r}) normalizes each sublayer's output before "
            "adding it to the residual stream, which cancels or distorts the fold. Use a ghost operator "
            "instead (method='ghost' or another family), which works on post-norm models"
        )


def untie_embeddings(model: nn.Module, *, adapter: ModelAdapter | None = None) -> bool:
    """Give the lm_head its own copy of a weight tied to the token embedding.

    Sets ``config.tie_word_embeddings = False`` so that saving and reloading keep them apart.

    Returns
    -------
    bool
        Whether the embeddings were tied (and are now untied).
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    if not adapter.tied_embeddings(model):
        return False
    head = adapter.lm_head(model)
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = adapter.config(model)
    config.tie_word_embeddings = False
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):
        sub = text_config(decoder=True)
        if sub is not config and hasattr(sub, "tie_word_embeddings"):
            sub.tie_word_embeddings = False
    return True


def _scale_linear_(module: nn.Module, alpha: float) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise GhostsolveError(f"cannot scale {type(module).__name__}: it has no weight tensor")
    with torch.no_grad():
        weight.mul_(alpha)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.mul_(alpha)


def fold_prune_comp(model: nn.Module, cut: int, alpha: float, *, adapter: ModelAdapter | None = None) -> None:
    """Multiply the stream entering layer ``cut`` by ``alpha``, in the weights (in place).

    Scales the token embedding and the o_proj and down_proj (weights and biases) of layers
    ``0 .. cut-1`` by ``alpha``. When the lm_head is tied to the embedding it is scaled with it, and the
    final norm's weight and bias are scaled by ``1 / alpha`` so that the logits are unchanged: the model
    stays tied, with no extra lm_head copy (see the module docstring).

    Parameters
    ----------
    model : transformers PreTrainedModel
        A pre-norm model, already pruned: ``cut`` is the index, in the current numbering, of the first
        kept layer after the removed interval (or the number of layers for an interval at the end).
    cut : int
    alpha : float
        The Prune&Comp scale, ``mean|Y| / mean|X|`` (a positive number).

    Raises
    ------
    GhostsolveError
        On a post-norm model, a non-positive or non-finite ``alpha``, or ``cut`` out of range. Nothing
        is changed then.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    require_pre_norm(adapter, "Prune&Comp")
    alpha = float(alpha)
    if not (alpha > 0 and alpha < float("inf")):
        raise GhostsolveError(f"the Prune&Comp scale must be a positive finite number, got {alpha}")
    layers = adapter.layers(model)
    if not 0 <= cut <= len(layers):
        raise GhostsolveError(f"cut {cut} is outside [0, {len(layers)}]")
    targets = [adapter.embeddings(model)]
    for layer in list(layers)[:cut]:
        targets += [adapter.o_proj(layer), adapter.down_proj(layer)]
    # The final norm's output feeds only the lm_head, and logits are linear in it: dividing it by α
    # undoes the α the shared weight gives the lm_head, exactly (an RMSNorm/LayerNorm's affine part is
    # elementwise, so scaling its weight and bias scales its output).
    compensate = adapter.final_norm(model) if adapter.tied_embeddings(model) else None
    if compensate is not None and not isinstance(getattr(compensate, "weight", None), torch.Tensor):
        raise GhostsolveError(
            f"the lm_head is tied to the embedding but the final norm {type(compensate).__name__} has no "
            "weight to compensate the scale in; untie it first (untie_embeddings)"
        )
    for module in targets:
        _scale_linear_(module, alpha)
    if compensate is not None:
        _scale_linear_(compensate, 1.0 / alpha)


def fold_replaceme(
    model: nn.Module, layer_index: int, transform: torch.Tensor, *, adapter: ModelAdapter | None = None
) -> None:
    """Fold ``m ↦ m T`` on the MLP output of layer ``layer_index`` into its down_proj (in place).

    ``W_down ← Tᵀ W_down`` and ``b ← b T``, computed in fp64 and stored in down_proj's dtype.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A pre-norm model (current layer numbering).
    layer_index : int
        The last kept layer before the cut.
    transform : (d, d) tensor
        ``T`` in the row-vector convention (the MLP output ``m`` becomes ``m T``).

    Raises
    ------
    GhostsolveError
        On a post-norm model, a bad index, a non-finite ``T`` or a shape mismatch.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    require_pre_norm(adapter, "ReplaceMe")
    layers = adapter.layers(model)
    if not 0 <= layer_index < len(layers):
        raise GhostsolveError(f"layer_index {layer_index} is outside [0, {len(layers)})")
    down = adapter.down_proj(layers[layer_index])
    d = down.weight.shape[0]
    if tuple(transform.shape) != (d, d):
        raise GhostsolveError(f"the ReplaceMe transform is {tuple(transform.shape)}; expected ({d}, {d})")
    if not bool(torch.isfinite(transform).all()):
        raise GhostsolveError("the ReplaceMe transform holds NaN/Inf; refit with a ridge or more tokens")
    with torch.no_grad():
        T = transform.to(device=down.weight.device, dtype=torch.float64)
        new_weight = T.T @ down.weight.to(torch.float64)
        down.weight.copy_(new_weight.to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((down.bias.to(torch.float64) @ T).to(down.bias.dtype))
