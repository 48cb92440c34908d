"""bwarea: BWArea models (world model, inverse dynamics, policy) on current PyTorch and transformers."""

from transformers import AutoConfig, AutoModelForCausalLM

from . import loading
from .checkpoint import convert_released_checkpoint
from .config import BWAreaConfig
from .model import BWAreaForCausalLM, BWAreaOutput
from .tokenizer import load_tokenizer

AutoConfig.register("bwarea", BWAreaConfig, exist_ok=True)
AutoModelForCausalLM.register(BWAreaConfig, BWAreaForCausalLM, exist_ok=True)

__all__ = ["BWAreaConfig", "BWAreaForCausalLM", "BWAreaOutput", "load_tokenizer", "convert_released_checkpoint"]
__version__ = "0.1.0"
