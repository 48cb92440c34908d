"""Generation and scoring for BWArea models.

    api.py          generate: transformers' call -> settings, ActionControls, the loop
    conventions.py  transformers' generate keywords, GenerationConfig and lengths
    controls.py     action controls, validated once (model, generate, server, CLI), and the action chooser
    processors.py   token processors (transformers' convention) and the sampler
    stopping.py     EOS, stop strings, stopping criteria
    loop.py         prefill, decode steps, streaming and the output object
    cache.py        KV caches
    backends/       the decode step: eager (reference), cpu, cuda
    scoring.py      fan-out, the world model per position, the exact language-model view
"""

from .api import BWAreaGenerationMixin
from .cache import PrefixKVCache, StaticKVCache
from .controls import GREEDY_BELOW, ActionControls, check_request
from .loop import BWAreaGenerateOutput
from .processors import FrequencyPresencePenalty, LogitBias

__all__ = ["BWAreaGenerationMixin", "BWAreaGenerateOutput", "ActionControls", "check_request", "GREEDY_BELOW",
           "StaticKVCache", "PrefixKVCache", "FrequencyPresencePenalty", "LogitBias"]
