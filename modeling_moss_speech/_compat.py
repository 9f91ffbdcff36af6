"""The package's remaining touch points on private or undocumented upstream attributes, one function each.

Everything else uses public transformers / TRL / datasets / torch API. What is left here has no public equivalent;
each function says why it is needed, and `tests/test_upstream_contract.py` pins the upstream attribute or behaviour
it relies on, so an upgrade that changes one fails there, by name, instead of somewhere downstream.

Overridden upstream hooks that cannot be a function here are pinned by the same test file:
`MossSpeechRotaryEmbedding._apply` (torch's `nn.Module.to` / `.half()` / `.bfloat16()` all route through `_apply`,
the only place to keep the rotary frequencies float32 across a cast).

This module imports nothing from the package, so any layer (configuration, modeling, processing, apps) may use it.
"""

from __future__ import annotations

from typing import Any

import torch

_MISSING = object()


# ------------------------------------------------------------------------------------------------ transformers


def compile_on_any_device(compile_config: Any) -> bool:
    """Whether `compile_config` (a `transformers.CompileConfig` or `None`) asks to auto-compile on CPU too.

    transformers' own `generate` auto-compiles only on an accelerator unless the private class flag
    `CompileConfig._compile_all_devices` is set (its tests set it to exercise compilation on CPU). MOSS-Speech's
    generate follows the same rule, so it reads the same flag; there is no public accessor.
    """
    return bool(compile_config is not None and getattr(compile_config, "_compile_all_devices", None))


def allocate_cache_layer(
    layer: Any, batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Allocate one cache layer (e.g. a `StaticLayer`) now, on `device`, instead of on its first `update`.

    The public `Cache.early_initialization` allocates every layer on ONE device; a model split with `device_map`
    needs each layer on the device its attention runs on. Both go through the layer's `lazy_initialization`
    (keys, values), which reads batch, heads, head size, dtype and device from two empty (B, H, 0, D) tensors.
    """
    empty = torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)
    layer.lazy_initialization(empty, empty)


def cache_adds_layers(cache: Any) -> bool:
    """Whether `cache` appends a layer slot on demand (a `DynamicCache()` built without a config).

    Such a cache starts with no slots and grows one per new layer index in `update`; the attribute recording the
    layer class it replicates (`Cache.layer_class_to_replicate`, `None` for a fixed list of slots) is the only way
    to tell it from a cache built with too few slots.
    """
    return getattr(cache, "layer_class_to_replicate", None) is not None


def registered_auto_class(cls: type) -> Any:
    """The auto class `cls.register_for_auto_class` recorded on `cls` itself; a sentinel when none is.

    `register_for_auto_class` stores it as the class attribute `_auto_class` and has no inverse; `save_pretrained`
    then copies code and writes `auto_map`. Reading (and, with [`restore_auto_class`], restoring) it is how a
    registration is made temporary.
    """
    return cls.__dict__.get("_auto_class", _MISSING)


def restore_auto_class(cls: type, previous: Any) -> None:
    """Undo `cls.register_for_auto_class(...)`: put back what [`registered_auto_class`] returned before it."""
    if previous is _MISSING:
        if "_auto_class" in cls.__dict__:
            delattr(cls, "_auto_class")
    else:
        cls._auto_class = previous


# ------------------------------------------------------------------------------------------------ datasets


def dataset_fingerprint(dataset: Any) -> str | None:
    """The fingerprint `datasets` keeps for a `Dataset` (changes whenever its content or transforms do); else `None`.

    `datasets` hashes every transform into `Dataset._fingerprint` to name its cache files but has no public
    accessor. Resumable preparation compares it with the one a previous run recorded, to refuse mixing shards
    built from different inputs.
    """
    fingerprint = getattr(dataset, "_fingerprint", None)
    return fingerprint if isinstance(fingerprint, str) else None


__all__ = [
    "allocate_cache_layer",
    "cache_adds_layers",
    "compile_on_any_device",
    "dataset_fingerprint",
    "registered_auto_class",
    "restore_auto_class",
]
