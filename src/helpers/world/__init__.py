"""The embedded world: a generated knowledge base, its tokenizer, and a GPT-2 model trained on it.

Public API::

    from helpers.world import WORLD_PRESETS, WorldConfig, TrainConfig, build_world, ensure_world_model
    folder = ensure_world_model("default", cache_dir)   # model + tokenizer + counterfact.json + corpus.txt
"""

from .generate import RELATIONS, Entity, Fact, Relation, World, WorldConfig, build_world, record_frequency
from .presets import WORLD_PRESETS, ensure_world_model, preset_configs, world_folder
from .train import TrainConfig, train_model

__all__ = [
    "RELATIONS", "Entity", "Fact", "Relation", "World", "WorldConfig", "build_world", "record_frequency",
    "TrainConfig", "WORLD_PRESETS", "ensure_world_model", "preset_configs", "train_model", "world_folder",
]
