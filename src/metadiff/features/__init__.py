"""open_clip models and the feature store (image, question and answer embeddings)."""
