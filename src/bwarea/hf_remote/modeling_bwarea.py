# Written by bwarea. With bwarea installed, transformers loads this folder in any process:
#     AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
"""BWArea for transformers' Auto classes (config.json's auto_map): the classes of the installed bwarea package."""

from bwarea.config import BWAreaConfig
from bwarea.model import BWAreaForCausalLM

__all__ = ["BWAreaConfig", "BWAreaForCausalLM"]
