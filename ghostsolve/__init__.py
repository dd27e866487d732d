"""ghostsolve: closed-form linear recovery of layer-pruned language models."""
