"""Many-class image sets for the data-free family: the embedded glyph set, folder datasets, episodes."""
