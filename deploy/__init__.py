"""Using what a run trained: recommendations, exported embeddings, serving (docs/design.md, layer 6)."""
