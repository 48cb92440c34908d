"""Generation for BWArea models (placeholder: filled by the generation work)."""


class BWAreaGenerationMixin:
    pass
