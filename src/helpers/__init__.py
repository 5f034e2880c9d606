"""Science code for the living book reproducing "Does Localization Inform Editing?"."""

__version__ = "0.1.0"
