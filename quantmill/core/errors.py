"""User-facing errors: one type, one line naming the bad thing, no traceback by default."""


class QuantmillError(Exception):
    """An error the user can fix (bad path, unknown recipe, unusable input)."""


class SourceError(QuantmillError):
    """A model source that cannot be resolved or is not a causal LM."""


class RecipeError(QuantmillError):
    """A recipe that is unknown or invalid."""


class DatasetError(QuantmillError):
    """A dataset spec that is unknown, unreadable or too short."""


class StatsError(QuantmillError):
    """Statistics that are missing what a recipe needs."""
