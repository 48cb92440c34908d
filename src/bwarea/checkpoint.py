"""Reading and writing BWArea weights: safetensors, both formats, atomic saves, errors that name the key.

Loading never unpickles unless asked (``allow_pickle=True``), and then only with ``weights_only``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import compat
from .config import BWAreaConfig

HUB_KWARGS = {"trust_remote_code", "local_files_only", "revision", "cache_dir", "token", "use_safetensors",
              "low_cpu_mem_usage", "attn_implementation", "force_download", "proxies", "subfolder",
              "_from_auto", "_from_pipeline", "adapter_kwargs", "code_revision", "key_mapping"}


def read_config(path: str | os.PathLike) -> tuple[BWAreaConfig, str]:
    """Folder -> (config, format) where format is "bwarea" or "released"."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {str(path)!r}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a BWArea checkpoint folder")
    config_dict = json.loads(config_file.read_text())
    if compat.is_released_config(config_dict):
        return BWAreaConfig.from_released_dict(config_dict), "released"
    if config_dict.get("model_type") != "bwarea":
        raise ValueError(f"{config_file} has model_type {config_dict.get('model_type')!r} and no action fields "
                         "(num_actions or num_code): it is not a BWArea checkpoint")
    return BWAreaConfig.from_pretrained(path), "bwarea"


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights in a folder: model.safetensors, a sharded safetensors index, or (opt-in) pytorch_model.bin."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index = path / index_name
        if index.is_file():
            if loader is None and not allow_pickle:
                raise ValueError(_pickle_message(index))
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(path / shard) if loader else _torch_load(path / shard))
            return state
    if (path / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise ValueError(_pickle_message(path / "pytorch_model.bin"))
        return _torch_load(path / "pytorch_model.bin")
    raise FileNotFoundError(f"{str(path)!r} holds no weights (model.safetensors, a safetensors index, or "
                            "pytorch_model.bin)")


def _pickle_message(file: Path) -> str:
    return (f"{file} is a pickle file; bwarea does not unpickle unless asked. Pass allow_pickle=True if you "
            "trust it, or convert it once with `bwarea convert`")


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def resolve_dtype(dtype, config: BWAreaConfig) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        stored = getattr(config, "dtype", None)
        return getattr(torch, stored) if isinstance(stored, str) else (stored or torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return getattr(torch, dtype)
    return dtype


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing every missing, unexpected or wrongly shaped key, with both shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for key in sorted(set(expected) - set(state_dict)):
        problems.append(f"missing key {key} (expected shape {expected[key]})")
    for key in sorted(set(state_dict) - set(expected)):
        problems.append(f"unexpected key {key} (shape {tuple(state_dict[key].shape)})")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(state_dict[key].shape) != expected[key]:
            problems.append(f"key {key} has shape {tuple(state_dict[key].shape)}, the config expects "
                            f"{expected[key]}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"checkpoint {source} does not fit its config:\n  {shown}")


def load_model(cls, path, *model_args, config=None, dtype=None, torch_dtype=None, device=None, device_map=None,
               allow_pickle=False, **kwargs):
    if model_args:
        raise TypeError("from_pretrained takes the checkpoint path and keyword arguments only")
    unknown = sorted(set(kwargs) - HUB_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown}")
    stored_config, fmt = read_config(path)
    config = config if isinstance(config, BWAreaConfig) else stored_config
    target = resolve_dtype(dtype if dtype is not None else torch_dtype, stored_config)
    state = read_state_dict(path, allow_pickle)
    if fmt == "released":
        state = compat.convert_released_state_dict(state)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, str(path))
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.config.dtype = target
    if device_map is not None and device is None and isinstance(device_map, (str, torch.device)):
        device = device_map
    if device is not None:
        model.to(device)
    return model.eval()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model(model, save_directory, state_dict=None, safe_serialization=True, is_main_process=True, **kwargs):
    """config.json + model.safetensors, each written atomically."""
    if not is_main_process:
        return
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    model.config.dtype = next(iter(state.values())).dtype
    model.config.architectures = [type(model).__name__]
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(model.config.to_json_string()))


def convert_released_checkpoint(src, dst, dtype=None, allow_pickle=False) -> None:
    """Write a released-format checkpoint folder as a bwarea one (weights, config, tokenizer files)."""
    import shutil

    from .model import BWAreaForCausalLM

    model = BWAreaForCausalLM.from_pretrained(src, dtype=dtype or "auto", allow_pickle=allow_pickle)
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens_map", "generation_config")) or name.endswith(".model"):
            shutil.copy2(Path(src) / name, Path(dst) / name)
