"""Config schema checks that run before any work starts, and the resolvers the config tree uses."""

from metadiff.config.resolvers import cfg_label, register_resolvers
from metadiff.config.validate import ConfigError, validate_config

register_resolvers()

__all__ = ["ConfigError", "cfg_label", "validate_config"]
