"""medsynth-core: the shared foundation of the medsynth packages."""

__version__ = "0.1.0"
