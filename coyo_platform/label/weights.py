"""The model and its weights: timm's architecture, weights from the hub or from a checkpoint
(a path, or any fsspec URL cached locally by fsspec's file cache), read as plain weights only,
never as pickled code. Imports no ``dagster``."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from coyo_platform.common.labelspace import NUM_MODEL_OUTPUTS
from coyo_platform.common.provenance import MissingInput, file_digest
from coyo_platform.common.storage import is_local, local_path
from coyo_platform.label.settings import DEFAULT_MODEL, LabelSettings, check_model_name


def local_checkpoint(url: str, cache_dir: str) -> str:
    """A local file holding the weights at ``url``: a path is used as it is; ``s3://``, ``hf://``,
    ``https://`` ... are copied once into ``cache_dir`` by fsspec's file cache, which fetches
    them again when the remote object changes (s3fs: its ETag), so every later run reads the
    local copy. The cache writes in place, so runs on one machine take turns (an flock on the
    cache folder): a second run waits for the first one's copy instead of reading it half-made."""
    import fcntl

    import fsspec

    if is_local(url):
        local = local_path(url)
        if not os.path.isfile(local):
            raise MissingInput(f"checkpoint {url}: no such file")
        return local
    cache = {"cache_storage": cache_dir, "check_files": True, "expiry_time": False}
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            return fsspec.open_local(f"filecache::{url}", filecache=cache)
        except FileNotFoundError:
            raise MissingInput(f"checkpoint {url}: no such object") from None


def read_weights(path: str, shown: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint file, read without running any pickled code:
    ``.safetensors``, or a torch file that ``torch.load(weights_only=True)`` accepts (plain
    tensors and containers). timm's ``load_state_dict`` reads it (and takes a training
    checkpoint's EMA, ``state_dict`` or ``model`` entry). ``shown`` names the file in errors.

    Raises:
        ValueError: the file needs pickled code (an object, a function) to load, and is refused;
            or it is not weights at all.
    """
    from timm.models import load_state_dict

    shown = shown or path
    unsafe = _unsafe_globals(path)
    if unsafe:
        raise ValueError(
            f"checkpoint {shown}: refused: loading it needs pickled code "
            f"({', '.join(unsafe)}), which is never run; save the weights as safetensors or "
            "as a plain state_dict (torch.save(model.state_dict(), path))"
        )
    try:
        return load_state_dict(path, weights_only=True)  # explicit: never a full unpickle
    except Exception as exc:
        raise ValueError(
            f"checkpoint {shown}: cannot be read as weights (safetensors, or a plain state_dict "
            f"that torch.load(weights_only=True) accepts; nothing else is unpickled): "
            f"{_first_lines(exc)}"
        ) from exc


def _unsafe_globals(path: str) -> list[str]:
    """The globals a torch checkpoint's pickle names beyond what ``weights_only`` allows, read
    statically by torch (nothing is unpickled); none for safetensors and other formats."""
    if path.endswith(".safetensors"):
        return []
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip checkpoint: the weights_only load decides
        return []


def _first_lines(exc: BaseException, limit: int = 300) -> str:
    """The innermost error in short: torch's ``Unsupported ...`` or ``size mismatch`` line, else
    its first two lines (``Error(s) in loading state_dict ...: Missing key(s) ...``)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported" in line or "size mismatch" in line]
    text = telling[0] if telling else " ".join(lines[:2]) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classifier_outputs(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[str, int] | None:
    """(key, outputs) of the checkpoint's classifier, the layer timm names for the model."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for name in (names,) if isinstance(names, str) else names:
        for key in (f"{name}.weight", f"{name}.bias"):
            value = state_dict.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return key, int(value.shape[0])
    return None


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's weights (names, dtypes, shapes and bytes, in state_dict order): the
    content digest of hub weights, whose file this process does not see."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _from_checkpoint(settings: LabelSettings) -> tuple[torch.nn.Module, str]:
    import timm

    checkpoint = local_checkpoint(settings.checkpoint, settings.cache)
    digest = file_digest(checkpoint)
    state_dict = read_weights(checkpoint, settings.checkpoint)
    model = timm.create_model(settings.model, pretrained=False, num_classes=NUM_MODEL_OUTPUTS)
    fit = (
        f"checkpoint {settings.checkpoint} does not fit {settings.model} "
        f"with {NUM_MODEL_OUTPUTS} outputs"
    )
    found = _classifier_outputs(model, state_dict)
    if found is not None and found[1] != NUM_MODEL_OUTPUTS:
        raise ValueError(
            f"{fit}: its classifier ({found[0]}) has {found[1]:,} outputs; labeling needs "
            f"{NUM_MODEL_OUTPUTS:,} (ImageNet-21k in Google's ordering, e.g. {DEFAULT_MODEL})"
        )
    try:
        model.load_state_dict(state_dict)  # strict, as timm's checkpoint_path loading is
    except RuntimeError as exc:
        raise ValueError(f"{fit}: {_first_lines(exc)}") from exc
    return model, digest


def load_model(settings: LabelSettings) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """The model in eval mode, its data config (with the settings' overrides applied), and the
    weights' content digest: the checkpoint file's sha256 (the same file under another path or
    URL has the same one), or, for the hub's pretrained weights, :func:`weights_digest`.

    A checkpoint is read as plain weights only (:func:`read_weights`: no pickled code runs) and
    must have the 21,843 outputs labeling needs; either problem is a ``ValueError`` naming the file.
    """
    import timm
    from timm.data import resolve_data_config

    check_model_name(settings.model)
    if settings.checkpoint:
        model, digest = _from_checkpoint(settings)
    else:
        model = timm.create_model(settings.model, pretrained=True)
        digest = weights_digest(model)
    if model.num_classes != NUM_MODEL_OUTPUTS:
        raise ValueError(
            f"model {settings.model} has {model.num_classes} outputs; labeling needs "
            f"{NUM_MODEL_OUTPUTS} (ImageNet-21k in Google's ordering, e.g. {DEFAULT_MODEL})"
        )
    config = resolve_data_config(model=model, use_test_size=True)
    if settings.image_size:
        config["input_size"] = (3, settings.image_size, settings.image_size)
    if settings.interpolation:
        config["interpolation"] = settings.interpolation
    if settings.mean:
        config["mean"] = tuple(settings.mean)
    if settings.std:
        config["std"] = tuple(settings.std)
    config["crop_pct"], config["crop_mode"] = 1.0, "squash"
    config["resize"] = settings.resize or "timm"
    return model.eval(), config, digest
