"""Released ``IntentionForCausalLM``: the same model, under bwarea's implementation."""

from bwarea import BWAreaForCausalLM as IntentionForCausalLM  # noqa: F401
