"""A stopping replica gets as long as its longest allowed stream takes (cluster.serving.placement.graceful_shutdown_s)."""

from cluster.config import ModelConfig
from cluster.serving.placement import (DRAIN_MARGIN_S, DRAIN_MS_PER_TOKEN, deployment_options, graceful_shutdown_s,
                                       ingress_options)


def _model(**kw) -> ModelConfig:
    base = dict(name="llama", source="TheBloke/Llama-2-70B-AWQ", quantization="awq", accelerator="A10G",
                tensor_parallel_size=2, max_model_len=4096)
    return ModelConfig(**{**base, **kw})


def test_drain_covers_a_full_length_generation_at_the_assumed_speed():
    # 4096 tokens at 100 ms each, rounded up, plus the margin: the number the chart's NOTES print.
    assert (DRAIN_MS_PER_TOKEN, DRAIN_MARGIN_S) == (100, 30)
    assert graceful_shutdown_s(_model()) == 410 + 30
    assert deployment_options(_model())["graceful_shutdown_timeout_s"] == 440


def test_a_smaller_max_tokens_limit_shortens_the_drain():
    assert graceful_shutdown_s(_model(limits={"max_tokens": 1000})) == 100 + 30
    # A limit above max_model_len cannot make a stream longer than the context.
    assert graceful_shutdown_s(_model(limits={"max_tokens": 9000})) == 440
    assert graceful_shutdown_s(_model(max_model_len=4095)) == 410 + 30  # 409.5 s rounds up


def test_without_max_model_len_the_checkpoint_context_bounds_it():
    # Llama-2-70B was trained for 4096 positions.
    assert graceful_shutdown_s(_model(max_model_len=None)) == 440


def test_the_ingress_drains_as_long_as_the_longest_model():
    # It relays every model's streams: Serve's default 20 s would cut a long one at an upgrade.
    models = [_model(), _model(name="short", limits={"max_tokens": 1000})]
    assert ingress_options(models) == {"graceful_shutdown_timeout_s": 440}
