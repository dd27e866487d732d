"""Which decoder layers to remove: the published selection rules and a recoverability-aware one.

Every rule scores a model on calibration batches and returns a :class:`Selection`: the 0-based indices of
the layers to remove, the per-layer or per-block scores behind the choice, and details for the report.

Hidden states and what each score compares
------------------------------------------
``h_l`` is the residual stream *entering* decoder layer ``l`` (0-based), captured by a forward pre-hook on the
layer, for ``l = 0 .. L-1``; ``h_L`` is the input of the final norm, i.e. the output of the last layer before
normalization. This is the convention of ``docs/design.md`` (``X`` and ``Y`` of a removed interval). Hugging
Face's ``output_hidden_states`` returns ``h_0 .. h_{L-1}`` too, but its last entry is taken *after* the final
norm; comparing against it would score the last layer on a different scale, so it is not used.

All cosines are computed **per token over the hidden dimension**, in fp64, over the tokens that the
attention mask keeps (padding never counts), and then averaged over tokens. Some reference implementations
call ``cosine_similarity`` along the token (sequence) axis of a ``(batch, tokens, hidden)`` tensor instead,
which compares a feature's trajectory over positions rather than two token representations; that is not the
quantity the papers define, and this module does not reproduce it.

Strategies (``STRATEGIES``)
---------------------------
==================  =====  ===========================================================================
name                unit   score and rule
==================  =====  ===========================================================================
block-influence     layer  ShortGPT: ``BI_l = 1 - mean_t cos(h_l, h_{l+1})``; remove the ``n`` lowest
                           (possibly non-contiguous).
angular             block  Gromov et al.: ``d_l = mean_t arccos(cos(h_l, h_{l+n})) / pi``; remove the
                           block ``l .. l+n-1`` with the smallest distance. ``last_token=True`` uses only
                           the last (non-padding) token of each sequence, as the paper does.
streamline          block  LLM-Streamline: ``s_l = mean_t cos(h_l, h_{l+n})``; remove the block with the
                           highest similarity.
sleb                layer  SLEB: iterative and greedy; each round removes the layer whose (additional)
                           removal gives the lowest calibration perplexity, recomputed after each removal.
ppl                 layer  Shortened LLaMA (PPL): calibration perplexity with each layer removed alone;
                           remove the ``n`` lowest, one shot.
taylor              layer  Shortened LLaMA (Taylor+): ``sum |w * dL/dw|`` over the layer's parameters;
                           remove the ``n`` lowest among layers outside the first ``keep_first`` and last
                           ``keep_last`` (the "+" heuristic).
recoverable         block  New: ``min_W sum_t ||h_l W - h_{l+n}||^2 / sum_t ||h_{l+n}||^2``, the residual
                           of the ghost (``family="full"``) fit of block ``(l, l+n)`` relative to the
                           stream, for every block from one pass of statistics; remove the smallest.
                           (``normalize="block"`` divides by ``sum_t ||h_{l+n} - h_l||^2`` instead.)
recoverable-ppl     block  New: the ``top_k`` best ``recoverable`` blocks, re-ranked by calibration
                           perplexity after ghost recovery.
recoverable-greedy  layer  New: SLEB's iterative greedy search, but each candidate removal set is
                           ghost-recovered (fitted on the calibration batches) before its calibration
                           perplexity is measured; may remove non-contiguous layers.
==================  =====  ===========================================================================

``Selection.scores`` is indexed by layer (length ``L``) for unit ``layer`` and by block start ``l``
(length ``L - n + 1``, block ``l .. l+n-1``) for unit ``block``.

Removal in the perplexity-based rules is simulated by :func:`ghostsolve.pipeline.model.surgery.bypassed`
(the layer still runs, its result is discarded), which equals removing the layer for a forward pass without a
cache and leaves the model's structure, config and per-layer attributes untouched. Every score runs on the
capture engine (:mod:`ghostsolve.pipeline.capture`) and the one perplexity routine
(:func:`ghostsolve.pipeline.evaluate.mean_nll`).

Modules: :mod:`.base` (the result, the registry entry and the context every rule receives), :mod:`.cosine`,
:mod:`.removal` (perplexity with layers removed), :mod:`.taylor`, :mod:`.recoverable`, :mod:`.strategies`
(the registry and :func:`select_layers`), :mod:`.report` (table, JSON, plot).
"""

from __future__ import annotations

from ghostsolve.pipeline.model.batches import Batch
from ghostsolve.pipeline.select.base import Selection, SelectionContext, Strategy
from ghostsolve.pipeline.select.strategies import STRATEGIES, select_layers

__all__ = ["STRATEGIES", "Batch", "Selection", "SelectionContext", "Strategy", "select_layers"]
