"""The ground floor: one file per strategy (its pure math and one worker program written
against ``syncbench.strategies.program``), every strategy's options model (``options.py``,
torch-free: configs are validated without importing torch), the registry, and activation
checkpointing.
Imports nothing from ``experiments``, ``sweeps`` or ``analysis``."""

from syncbench.strategies.registry import OPTIONS, STRATEGIES, register, traits, unregister

__all__ = ["OPTIONS", "STRATEGIES", "register", "traits", "unregister"]
