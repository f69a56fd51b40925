"""Loading a generator from any source (our checkpoint or run directory, a SNAC directory, a hub id)
and exporting to the SNAC format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ._snac import snac
import torch

from .config import ConfigError, ModelConfig, _coerce, _hints
from .errors import first_line
from .model import build_generator


class ModelLoadError(ValueError):
    """A model source is missing, incomplete, not cached, or does not hold a SNAC generator."""


SNAC_FILES = ("config.json", "pytorch_model.bin")


def model_config_from_dict(d: Dict[str, Any], where: str) -> ModelConfig:
    """A ModelConfig from a SNAC ``config.json`` dict, with errors that name the file."""
    hints = _hints(ModelConfig)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ModelLoadError(f"{where}: unknown SNAC config keys {unknown}")
    try:
        return ModelConfig(**{k: _coerce(v, hints[k], f"model.{k}") for k, v in d.items()})
    except ConfigError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def _load_state(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/foreign files raise many types
        raise ModelLoadError(f"cannot read {path}: {first_line(e)}") from None


def _build_loaded(cfg: ModelConfig, state: Dict[str, Any], where: str) -> snac.SNAC:
    model = build_generator(cfg, init=None)  # every weight is loaded next
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{where}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model


def load_snac_dir(path: os.PathLike) -> Tuple[snac.SNAC, ModelConfig]:
    """Load a SNAC directory (``config.json`` + ``pytorch_model.bin``)."""
    path = Path(path)
    missing = [f for f in SNAC_FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path} is not a SNAC directory: missing {', '.join(missing)} "
                             f"(expected {' and '.join(SNAC_FILES)})")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    cfg = model_config_from_dict(raw, str(path / "config.json"))
    return _build_loaded(cfg, _load_state(path / "pytorch_model.bin"), str(path)), cfg


def load_training_checkpoint_generator(path: os.PathLike) -> Tuple[snac.SNAC, ModelConfig]:
    """The generator of one of our training checkpoints (``*.pt``)."""
    path = Path(path)
    ckpt = _load_state(path)
    if not isinstance(ckpt, dict) or "generator" not in ckpt or "config" not in ckpt:
        raise ModelLoadError(f"{path} is not a training checkpoint of this toolkit (no generator/config)")
    cfg = model_config_from_dict(ckpt["config"]["model"], f"{path} [config.model]")
    return _build_loaded(cfg, ckpt["generator"], str(path)), cfg


def _resolve_run_dir(path: Path) -> Optional[Path]:
    latest = path / "checkpoints" / "latest.pt"
    return latest if latest.is_file() else None


def load_generator(source: str | os.PathLike, device: str | torch.device = "cpu") -> Tuple[snac.SNAC, ModelConfig]:
    """Load a SNAC generator from any of: our checkpoint file, a run directory (its latest
    checkpoint), a SNAC directory, or a Hugging Face hub id (from the local cache when offline).

    Returns ``(model in eval mode on device, ModelConfig)``.
    """
    path = Path(source)
    if path.is_file():
        model, cfg = load_training_checkpoint_generator(path)
    elif path.is_dir():
        latest = _resolve_run_dir(path)
        model, cfg = load_training_checkpoint_generator(latest) if latest else load_snac_dir(path)
    elif _looks_like_hub_id(str(source)):
        model, cfg = load_snac_dir(_download_from_hub(str(source)))
    else:
        raise ModelLoadError(f"model not found: {source} (expected a checkpoint file, a SNAC directory "
                             "or a Hugging Face hub id such as hubertsiuzdak/snac_24khz)")
    return model.to(device).eval(), cfg


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _download_from_hub(repo_id: str) -> Path:
    """Find a SNAC repo's two files in the local HF cache, else download them (unless offline)."""
    from huggingface_hub import hf_hub_download

    paths = []
    for name in SNAC_FILES:
        try:
            paths.append(Path(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True)))
            continue
        except Exception:  # noqa: BLE001 - not cached: try the network below
            pass
        try:
            if _hub_offline():
                raise ConnectionError("HF_HUB_OFFLINE is set")
            paths.append(Path(hf_hub_download(repo_id=repo_id, filename=name)))
        except Exception as e:  # noqa: BLE001 - network/auth errors all end the same way
            raise ModelLoadError(
                f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                f"({type(e).__name__}); run `huggingface-cli download {repo_id}` where there is network, "
                "or pass a local SNAC directory") from None
    return paths[0].parent


def export_snac(model: snac.SNAC, cfg: ModelConfig, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a SNAC directory loadable by ``snac.SNAC.from_pretrained(out_dir)``.

    Files are written to temporaries and renamed, so a crash never leaves a half-written model.
    An existing SNAC directory is replaced only with ``overwrite=True``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"export target {out} exists and is not a directory")
    if not overwrite and any((out / f).exists() for f in SNAC_FILES):
        raise ModelLoadError(f"{out} already holds a SNAC model; choose another directory or pass overwrite")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_write(out / "pytorch_model.bin", lambda f: torch.save(state, f))
    _atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg.snac_kwargs(), indent=2).encode()))
    return out


def _atomic_write(path: Path, write) -> None:
    # Not mkstemp (mode 0600): an export is meant to be shared, so the user's umask decides.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
