"""usage-proxy: a metering reverse proxy for the Anthropic Messages API."""

__version__ = "0.1.0"
