"""Plain `nn.Module`s whose parameters can also be supplied functionally (flat vectors, batched over tasks)."""
