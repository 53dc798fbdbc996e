"""The dist backend: the strategies' worker programs in real processes over torch.distributed."""
