# The configs of `sagan` (installed as the package sagan.conf). Importing it, which Hydra does before composing,
# registers the schema that config.yaml builds on, so every entry point and test composes the same way.
from sagan.config import register_configs

register_configs()
