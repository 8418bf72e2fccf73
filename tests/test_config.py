import pytest

from minigpt import GPTConfig, TrainConfig
from minigpt.errors import ConfigError


def test_defaults_match_the_original_script():
    config, train = GPTConfig(vocab_size=65), TrainConfig()
    assert (config.block_size, config.embed_dim, config.num_heads, config.num_layers, config.mlp_ratio) == \
        (128, 128, 4, 2, 4)
    assert (train.batch_size, train.learning_rate, train.steps, train.eval_interval) == (32, 3e-4, 200, 50)


def test_heads_must_divide_embedding():
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        GPTConfig(vocab_size=10, embed_dim=130, num_heads=4)


@pytest.mark.parametrize("field,value", [("block_size", 0), ("embed_dim", -8), ("num_layers", 0),
                                         ("num_heads", 0), ("vocab_size", 0)])
def test_sizes_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**{"vocab_size": 10, field: value})


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("learning_rate", 0.0),
                                         ("device", "tpu"), ("warmup", -1)])
def test_training_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_json_round_trip_and_unknown_fields():
    config = GPTConfig(vocab_size=7, block_size=9, embed_dim=12, num_heads=3)
    assert GPTConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown fields"):
        GPTConfig.from_json('{"vocab_size": 5, "n_embd": 3}')
    with pytest.raises(ConfigError, match="incomplete"):
        GPTConfig.from_json('{"block_size": 5}')


@pytest.mark.parametrize("fields", [dict(vocab_size=65), dict(vocab_size=100, num_layers=3, embed_dim=96, num_heads=3,
                                                               mlp_ratio=2, block_size=40)])
def test_the_parameter_count_known_before_building_is_the_models(fields):
    from minigpt.model import MiniGPT
    from minigpt.training_checks import parameter_count

    config = GPTConfig(**fields)
    assert parameter_count(config) == MiniGPT(config).num_parameters()
