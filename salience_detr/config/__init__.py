"""Loading a LazyConfig for use: strict overrides, the config's datasets registered and checked, classes resolved.

Every entry point that builds a model from a config (train_net, the demo, the tools) goes through here, so they all
see the config exactly as training does.
"""

from salience_detr.config.loading import load_config  # noqa: F401
from salience_detr.config.overrides import ConfigOverrideError, apply_overrides  # noqa: F401
from salience_detr.config.zoo import get_config, get_config_file, list_configs  # noqa: F401
