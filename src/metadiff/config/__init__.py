"""Config schema checks that run before any work starts."""

from metadiff.config.validate import ConfigError, validate_config

__all__ = ["ConfigError", "validate_config"]
