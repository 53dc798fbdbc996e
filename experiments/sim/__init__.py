"""The sim backend: the strategies' worker programs on a virtual clock (``engine``)."""
