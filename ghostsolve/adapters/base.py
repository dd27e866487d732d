"""The adapter protocol: architecture facts about a decoder-only causal language model.

An adapter answers *where* things are and *how* the architecture is arranged; it never computes.
Capture, removal, insertion and folding are generic pipeline functions that read these facts.

The facts are class attributes (dotted attribute paths and flags), so a new family is usually a
subclass that overrides a few strings. The accessor methods only resolve those paths on a model or a
decoder layer (a layer holding a ghost operator is still that layer), and :meth:`ModelAdapter.hidden_states`
/ :meth:`ModelAdapter.replace_hidden_states` are the one place where a layer call's residual-stream argument
is read or replaced.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError

NormPlacement = Literal["pre", "post"]

__all__ = ["ModelAdapter", "NormPlacement", "resolve_path"]


def resolve_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``.

    Raises
    ------
    GhostsolveError
        If an attribute on the path is missing; the message names the path and the missing part.
    """
    obj = root
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise GhostsolveError(
                f"{type(root).__name__} has no attribute path {path!r} (missing {part!r} on "
                f"{type(obj).__name__}); the adapter does not match this model's layout"
            ) from err
    return obj


class ModelAdapter:
    """Architecture facts of one model family (the base holds the Llama layout).

    Subclass it and override the class attributes that differ; register the subclass with
    :func:`ghostsolve.adapters.register_adapter`. Every path is relative to the ``*ForCausalLM``
    model (``layers_path``, ``embeddings_path``, ``final_norm_path``, ``lm_head_path``) or to one
    decoder layer (``attention_attr``, ``mlp_attr``) or to its attention / MLP module
    (``o_proj_attr``, ``down_proj_attr``).

    Attributes
    ----------
    model_types : tuple of str
        The ``config.model_type`` values this adapter describes.
    family : str
        A human name of the family, used in messages.
    layers_path : str
        Path of the ``nn.ModuleList`` of decoder layers.
    embeddings_path, final_norm_path, lm_head_path : str
        Paths of the token embedding, the final norm and the output projection.
    norm_placement : {"pre", "post"}
        ``"pre"``: each sublayer normalizes its *input* and adds its raw output to the residual stream
        (Llama, Qwen). ``"post"``: each sublayer normalizes its *output* before the addition (OLMo-2),
        so scaling o_proj/down_proj does not scale the stream and a map on the MLP output cannot be
        folded into down_proj.
    attention_attr, mlp_attr : str
        Attribute names of the attention and MLP submodules inside a decoder layer.
    o_proj_attr, down_proj_attr : str
        Attribute names of the output projections (``nn.Linear``) of attention and MLP; these write
        into the residual stream.
    hidden_states_arg_position : int
        Position of the residual-stream argument in a decoder layer's ``forward``.
    hidden_states_kwarg : str
        Its keyword name, when passed by keyword.
    layer_idx_attr : str
        Name of the integer attribute (on the attention module and on any other submodule of a layer)
        that indexes the layer in a KV cache; renumbered after layer removal.
    per_layer_config_keys : tuple of str
        Config attributes that are lists with one entry per decoder layer (e.g. ``layer_types``).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = "generic"
    layers_path: ClassVar[str] = "model.layers"
    embeddings_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str] = "model.norm"
    lm_head_path: ClassVar[str] = "lm_head"
    norm_placement: ClassVar[NormPlacement] = "pre"
    attention_attr: ClassVar[str] = "self_attn"
    mlp_attr: ClassVar[str] = "mlp"
    o_proj_attr: ClassVar[str] = "o_proj"
    down_proj_attr: ClassVar[str] = "down_proj"
    hidden_states_arg_position: ClassVar[int] = 0
    hidden_states_kwarg: ClassVar[str] = "hidden_states"
    layer_idx_attr: ClassVar[str] = "layer_idx"
    per_layer_config_keys: ClassVar[tuple[str, ...]] = ("layer_types",)

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"

    # -- facts that are flags -------------------------------------------------------------------
    @property
    def is_pre_norm(self) -> bool:
        """True when every sublayer normalizes its input (a scale of the stream passes through)."""
        return self.norm_placement == "pre"

    def tied_embeddings(self, model: nn.Module) -> bool:
        """Whether the lm_head shares its weight tensor with the token embedding."""
        head = self.lm_head(model)
        emb = self.embeddings(model)
        return getattr(head, "weight", None) is getattr(emb, "weight", object())

    # -- model-level locations ------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` of decoder layers (some may hold ghost operators)."""
        layers = resolve_path(model, self.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise GhostsolveError(
                f"{self.layers_path} of {type(model).__name__} is a {type(layers).__name__}, "
                "not an nn.ModuleList; the adapter does not match this model"
            )
        return layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder-layer list."""
        self._set(model, self.layers_path, layers)

    def embeddings(self, model: nn.Module) -> nn.Module:
        """The token embedding module (``nn.Embedding``)."""
        return resolve_path(model, self.embeddings_path)  # type: ignore[no-any-return]

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer (it may hold a ghost operator)."""
        return resolve_path(model, self.final_norm_path)  # type: ignore[no-any-return]

    def set_final_norm(self, model: nn.Module, norm: nn.Module) -> None:
        """Replace the final norm module."""
        self._set(model, self.final_norm_path, norm)

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary."""
        return resolve_path(model, self.lm_head_path)  # type: ignore[no-any-return]

    def config(self, model: nn.Module) -> Any:
        """The config object whose ``num_hidden_layers`` counts the decoder layers."""
        return resolve_path(model, "config")

    # -- layer-level locations ------------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention submodule of a decoder layer."""
        return resolve_path(layer, self.attention_attr)  # type: ignore[no-any-return]

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP submodule of a decoder layer."""
        return resolve_path(layer, self.mlp_attr)  # type: ignore[no-any-return]

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        """The attention output projection of a decoder layer (writes into the residual stream)."""
        return resolve_path(self.attention(layer), self.o_proj_attr)  # type: ignore[no-any-return]

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        """The MLP output projection of a decoder layer (writes into the residual stream)."""
        return resolve_path(self.mlp(layer), self.down_proj_attr)  # type: ignore[no-any-return]

    # -- the residual-stream argument of a layer call ------------------------------------------------
    def hidden_states(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The residual stream passed to a decoder layer (or to the final norm) in one call.

        The keyword ``hidden_states_kwarg`` wins over the positional argument
        ``hidden_states_arg_position``; this is the one place where every capture engine, the layer
        bypass of the selection rules and the ghost wrappers read it.

        Raises
        ------
        GhostsolveError
            If the call carries no tensor under either name.
        """
        value = kwargs.get(self.hidden_states_kwarg)
        if value is None and len(args) > self.hidden_states_arg_position:
            value = args[self.hidden_states_arg_position]
        if not isinstance(value, torch.Tensor):
            raise GhostsolveError(
                f"a {self.family} layer was called without its hidden states (keyword "
                f"{self.hidden_states_kwarg!r} or positional argument {self.hidden_states_arg_position}); "
                "the adapter's hidden_states_kwarg / hidden_states_arg_position do not match this model"
            )
        return value

    def replace_hidden_states(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of a layer call with the residual stream replaced by ``value`` (new
        containers; the inputs are not modified). Where the stream is read from: :meth:`hidden_states`.

        Raises
        ------
        GhostsolveError
            If the call carries no hidden states to replace.
        """
        key, position = self.hidden_states_kwarg, self.hidden_states_arg_position
        if kwargs.get(key) is not None:
            return tuple(args), {**kwargs, key: value}
        if len(args) > position:
            return (*args[:position], value, *args[position + 1 :]), dict(kwargs)
        self.hidden_states(args, kwargs)  # raises the message naming the expected argument
        raise AssertionError("unreachable")  # pragma: no cover

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _set(model: nn.Module, path: str, value: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = resolve_path(model, parent_path) if parent_path else model
        setattr(parent, name, value)
