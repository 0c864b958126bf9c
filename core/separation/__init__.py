"""Separating a mix into stems: the engine, the model catalogue, stem selection, batching, blocks."""
