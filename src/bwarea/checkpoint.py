"""Reading and writing BWArea weights: safetensors, both formats, atomic saves, errors that name the key.

Loading never unpickles unless asked (``allow_pickle=True``), and then only with ``weights_only``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import compat, hf_remote
from .config import BWAreaConfig
from .errors import BWAreaError

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
    config_dict = read_json_object(config_file, "config fields")
    try:
        if compat.is_released_config(config_dict):
            return BWAreaConfig.from_released_dict(config_dict), "released"
        if config_dict.get("model_type") != "bwarea":
            raise ValueError(f"model_type is {config_dict.get('model_type')!r} and there are no action fields "
                             "(num_actions or num_code): it is not a BWArea checkpoint")
        return BWAreaConfig.from_pretrained(path), "bwarea"
    except (ValueError, TypeError) as err:  # the config's own checks name the field; this adds the file
        raise BWAreaError(f"{config_file}: {str(err).removeprefix('BWAreaConfig: ')}") from err


def read_json_object(file: Path, what: str) -> dict:
    """A JSON file that must hold an object -> dict; BWAreaError naming the file otherwise."""
    try:
        value = json.loads(file.read_text(encoding="utf-8-sig"))  # JSON is UTF-8; editors may add a BOM
    except UnicodeDecodeError:
        raise BWAreaError(f"{file} is not JSON text (it is not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise BWAreaError(f"{file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(value, dict):
        raise BWAreaError(f"{file} must hold a JSON object of {what}, got a {type(value).__name__}")
    return value


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file -> its tensors; BWAreaError naming the file when it is empty, truncated or not one."""
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} " + ("is not a file" if file.exists() else
                                                                   "does not exist"))
    try:
        return load_file(file)
    except SafetensorError as err:
        size = file.stat().st_size
        raise BWAreaError(f"{file} is not a readable safetensors file ({size} bytes; {err}): it may be "
                          "truncated or damaged. Copy or convert it again") from None


def _index_shards(path: Path, index: Path) -> list[str]:
    """The shard files an index names, each checked to lie inside the checkpoint folder."""
    weight_map = read_json_object(index, "weight_map").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BWAreaError(f"{index} has no weight_map: it must map each weight name to its shard file")
    root = path.resolve()
    shards = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise BWAreaError(f"{index}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
        if os.path.isabs(shard) or not (path / shard).resolve().is_relative_to(root):
            raise BWAreaError(f"{index}: weight_map[{key!r}] points outside the checkpoint folder ({shard!r}); "
                              "shards must be files inside it")
        shards.add(shard)
    return sorted(shards)


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise BWAreaError naming the weights that hold NaN or infinity (one cheap pass over each tensor)."""
    bad = [key for key, t in state_dict.items() if t.is_floating_point() and not _all_finite(t)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BWAreaError(f"checkpoint {source}: weights {bad[0]}{more} hold NaN or infinite values, so the model "
                          "would only produce NaN; use an earlier checkpoint")


def _all_finite(t: torch.Tensor) -> bool:
    # A NaN or an infinity anywhere makes the sum NaN or infinite, and a sum is ~40x faster than isfinite.
    # float16 sums in float32 (its own range overflows on finite weights); bf16 has float32's range. Only a
    # non-finite sum (finite weights can overflow it) needs the element-wise check.
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights in a folder: model.safetensors, a sharded safetensors index, or (opt-in) pytorch_model.bin."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index = path / index_name
        if index.is_file():
            if loader is None and not allow_pickle:
                raise BWAreaError(_pickle_message(index))
            state = {}
            for shard in _index_shards(path, index):
                state.update(_load_safetensors(path / shard) if loader else _torch_load(path / shard))
            return state
    if (path / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise BWAreaError(_pickle_message(path / "pytorch_model.bin"))
        return _torch_load(path / "pytorch_model.bin")
    raise FileNotFoundError(f"{str(path)!r} holds no weights (model.safetensors, a safetensors index, or "
                            "pytorch_model.bin)")


def _pickle_message(file: Path) -> str:
    return (f"{file} is a pickle file; bwarea does not unpickle unless asked. If you trust it, pass "
            "--allow-pickle on the command line (allow_pickle=True in Python), or convert it once to safetensors "
            "with `bwarea convert SRC DST --allow-pickle`")


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as err:
        raise BWAreaError(f"{file} is not a readable PyTorch weights file ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BWAreaError(f"{file} does not hold a dict of tensors")
    return state


def resolve_dtype(dtype, config: BWAreaConfig) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        stored = getattr(config, "dtype", None)
        return getattr(torch, stored) if isinstance(stored, str) else (stored or torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise BWAreaError(f"unknown dtype {dtype!r}")
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
    # None means "not set" (lm-eval passes gguf_file=None, quantization_config=None, max_memory=None).
    unknown = sorted(k for k, v in kwargs.items() if k not in HUB_KWARGS and v is not None)
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown}")
    stored_config, fmt = read_config(path)
    config = config if isinstance(config, BWAreaConfig) else stored_config
    target = resolve_dtype(dtype if dtype is not None else torch_dtype, stored_config)
    state = read_state_dict(path, allow_pickle)
    check_finite(state, str(path))
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


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_new_file(path) -> None:
    """Give ``path`` the mode a newly created file gets (0o666 less the umask): mkstemp makes files 0600,
    and a model folder a user shares must follow their umask like any other file they write."""
    os.chmod(path, 0o666 & ~current_umask())


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        share_like_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Replace the text file ``path`` atomically (a crash leaves the old or the new content, never half)."""
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model(model, save_directory, state_dict=None, safe_serialization=True, is_main_process=True, **kwargs):
    """config.json + model.safetensors + modeling_bwarea.py, each written atomically.

    config.json's ``auto_map`` names modeling_bwarea.py (bwarea/hf_remote), so plain transformers loads the folder
    with ``trust_remote_code=True`` in a process that never imported bwarea.
    """
    if not is_main_process:
        return
    out = Path(save_directory)
    remote_code = _remote_code_to_write(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    model.config.dtype = next(iter(state.values())).dtype
    model.config.architectures = [type(model).__name__]
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = {**json.loads(model.config.to_json_string()), "auto_map": hf_remote.AUTO_MAP}
    if remote_code is not None:
        _atomic_write(out / hf_remote.MODULE_NAME, lambda tmp: Path(tmp).write_text(remote_code))
    _atomic_write(out / "config.json",
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def _remote_code_to_write(out: Path) -> str | None:
    """The text of modeling_bwarea.py to write into ``out``, or None where it is there already. A file of that
    name that bwarea did not write is never replaced: FileExistsError names it."""
    text = hf_remote.MODULE_FILE.read_text()
    target = out / hf_remote.MODULE_NAME
    if not (target.exists() or target.is_symlink()):
        return text
    current = target.read_text(errors="replace") if target.is_file() else ""
    if current == text:
        return None
    if not current.startswith(hf_remote.MARKER) or target.is_symlink():
        raise FileExistsError(f"{target} exists and was not written by bwarea; a saved checkpoint writes its own "
                              f"{hf_remote.MODULE_NAME} there (for transformers' auto_map): move that file away or "
                              "save to another folder")
    return text


def convert_released_checkpoint(src, dst, dtype=None, allow_pickle=False) -> None:
    """Write a released-format checkpoint folder as a bwarea one (weights, config, tokenizer files)."""
    import shutil

    from .model import BWAreaForCausalLM

    model = BWAreaForCausalLM.from_pretrained(src, dtype=dtype or "auto", allow_pickle=allow_pickle)
    model.save_pretrained(dst)
    for name in converted_file_names(src)[3:]:
        target = Path(dst) / name
        if target.is_symlink():  # replace the link itself, never the file it points to
            target.unlink()
        shutil.copy2(Path(src) / name, target)


def converted_file_names(src) -> list[str]:
    """The names ``convert_released_checkpoint`` writes into its destination: the weights, config and
    transformers' remote-code module (save_pretrained), then the tokenizer and generation files it copies from
    ``src``."""
    copied = sorted(name for name in os.listdir(src) if (Path(src) / name).is_file() and (
        name.startswith(("tokenizer", "special_tokens_map", "generation_config")) or name.endswith(".model")))
    return ["model.safetensors", "config.json", hf_remote.MODULE_NAME, *copied]
