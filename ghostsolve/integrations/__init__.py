"""Bridges to other engines: serving with vLLM, composing with llm-compressor.

Each bridge imports its engine lazily, inside the functions that need it: ``import
ghostsolve.integrations.vllm`` works without vLLM installed (its pure logic — which architectures, where the
operators go, how weight names map — is tested everywhere), and only
:func:`ghostsolve.integrations.vllm.register` needs vLLM itself.

* :mod:`ghostsolve.integrations.vllm` — an out-of-tree model plugin (entry point ``vllm.general_plugins``)
  that serves ghosted checkpoints on top of vLLM's own Llama, Mistral, Qwen2 and Qwen3 classes.
* :mod:`ghostsolve.integrations.llmcompressor` — ``GhostsolveModifier``, layer removal and recovery as a step
  of an llm-compressor recipe.

The ``integrations`` layer sits above the pipeline and the workflows; nothing below imports it.
"""
