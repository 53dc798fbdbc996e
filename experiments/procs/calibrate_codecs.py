"""``syncbench calibrate`` times the gradient codecs too: the encode + decode seconds per MB
that one worker of an N-worker exchange spends (``compression.codec_seconds_per_mb``: one
encode, and N decodes for the all-gather codecs int8 and top-k), on a payload the size of the
task's gradients, for every codec. All of them go into the profile's metadata; the config's
own codec (``strategy.compression``), when it has one, also becomes the profile's
``cluster.compute.codec_s_per_mb`` -- one number that holds for that codec only, so a profile
made for an uncompressed config pins none and the sim (or a sweep, per task and codec) keeps
measuring it."""

from __future__ import annotations

from typing import Any, get_args

CODEC_REPEATS = 5


def measure_codecs(config: Any, workers: int) -> dict[str, float]:
    """``{codec: seconds per MB}`` of every codec at ``workers`` workers, with the config's
    ``topk_ratio`` and ``powersgd_rank`` (their defaults where its strategy has none)."""
    import torch  # heavy: see calibrate's imports

    from syncbench.experiments.task import one_thread, prepare_task
    from syncbench.strategies import compression
    from syncbench.strategies.options import CodecName, CompressionOptions
    from syncbench.strategies.program import gradient_payload

    options = config.strategy.options()
    chosen = {k: getattr(options, k) for k in ("topk_ratio", "powersgd_rank") if hasattr(options, k)}
    out = {}
    with one_thread():  # as each dist worker runs: one intra-op thread
        task = prepare_task(config)
        shapes = compression.param_shapes(task.module)
        payload = torch.randn(gradient_payload(task.module).numel(), generator=torch.Generator().manual_seed(0))
        for name in get_args(CodecName):
            if name == "none":
                continue
            codec = compression.make_codec(CompressionOptions(compression=name, **chosen), shapes)
            assert codec is not None
            out[name] = compression.codec_seconds_per_mb(codec, payload, workers, CODEC_REPEATS)
    return out


def codec_profile_keys(config: Any, measured: dict[str, float]) -> dict[str, float]:
    """The ``cluster.compute`` key a profile pins: the config's own codec's cost, if it has one."""
    name = getattr(config.strategy.options(), "compression", "none")
    return {"codec_s_per_mb": float(f"{measured[name]:.6g}")} if name != "none" else {}
