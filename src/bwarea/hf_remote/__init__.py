"""The module a bwarea checkpoint folder carries, so that plain transformers loads it without ``import bwarea``.

``save_pretrained`` (and so ``bwarea convert`` and every training stage) writes ``modeling_bwarea.py``, a copy of
the file beside this one, into the folder and points config.json's ``auto_map`` at it::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)   # BWAreaForCausalLM
    AutoConfig.from_pretrained(path, trust_remote_code=True)             # BWAreaConfig

The copied module holds no model code: it imports the installed bwarea package, so the folder always runs the
bwarea that is installed (``pip install bwarea`` is the one requirement).
"""

from pathlib import Path

MODULE_NAME = "modeling_bwarea.py"
MODULE_FILE = Path(__file__).with_name(MODULE_NAME)
# The first line of every modeling_bwarea.py bwarea writes: bwarea replaces only files that start with it.
MARKER = "# Written by bwarea"
AUTO_MAP = {"AutoConfig": "modeling_bwarea.BWAreaConfig",
            "AutoModelForCausalLM": "modeling_bwarea.BWAreaForCausalLM"}
