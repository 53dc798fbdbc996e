"""The ground floor: one file per strategy (its options, pure math and one worker program
written against ``syncbench.strategies.program``), the registry, and activation checkpointing.
Imports nothing from ``experiments``, ``sweeps`` or ``analysis``."""

from syncbench.strategies.registry import STRATEGIES

__all__ = ["STRATEGIES"]
