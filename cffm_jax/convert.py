"""Conversion of PyTorch checkpoints (official CFFM / CFFM++, SegFormer ImageNet ``mit_b*.pth``, Hugging Face
SegFormer) into Flax variables. Pure numpy; torch is imported only to read ``.pth`` files.

The mapping is one rule plus a short table, because the Flax modules keep the official names:

* an official key is split on ``.``; every all-digit component is merged into the previous one with ``_``
  (``backbone.block1.0.attn.q.weight`` -> ``backbone/block1_0/attn/q/weight``);
* the last component decides the Flax leaf and the layout change:
  ``weight`` -> ``kernel`` of a Dense (torch ``(out, in)`` transposed; a 1x1 conv ``(out, in, 1, 1)`` used as a
  per-pixel Linear squeezed then transposed) or of a Conv (``OIHW`` -> ``HWIO``), or ``scale`` of a
  LayerNorm/BatchNorm; ``bias`` -> ``bias``; BatchNorm ``running_mean``/``running_var`` -> the ``batch_stats``
  collection's ``mean``/``var``; any other name (the relative-position bias tables) is kept with the identical
  PyTorch layout.

Source keys that are deliberately not converted (``IGNORED``, each with its reason) are reported, never silently
dropped; anything else that does not map onto a Flax leaf is an error, as is a Flax leaf that no source key fills
(unless ``init_variables`` supplies fresh values for it) and any shape mismatch. All problems are collected and raised
together in one ``ConversionError``, which first names the model the checkpoint does fit when it is another size or
kind (``_closest_model``): with the wrong model name every key is reported, and that list alone does not say why.

Hugging Face SegFormer names are first renamed to the official ones (``hf_to_official``), for both the published
checkpoint naming (``segformer.encoder.block.0.0.attention.self.query``, transformers 4.x) and the transformers 5.x
module naming (``stages.0.blocks.0.attention.q_proj``); the separate key/value projections are concatenated into the
official ``kv``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from cffm_jax.models import build_model, example_inputs

# Keys that exist in official checkpoints but carry nothing our model needs; matched against the canonical key.
IGNORED: tuple[tuple[str, str], ...] = (
    (
        r"^decode_head\.conv_seg\.",
        "unused classifier of the mmseg base head (never called by the CFFM heads)",
    ),
    (r"num_batches_tracked$", "BatchNorm step counter (the momentum is fixed)"),
    (r"\.relative_position_index(_\w+)?$", "integer index buffer, recomputed and checked"),
    (r"\.valid_ind_rolled$", "integer index buffer, recomputed and checked"),
)
IGNORED_IMAGENET_HEAD = r"^head\."  # classifier of the ImageNet MiT checkpoints
IGNORED_HF_HEAD = r"^(decode_head|classifier)\."  # Hugging Face segmentation/classification heads


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key.

    The lists are also attributes (empty for an unreadable file), because the remedies differ: only missing leaves
    are fixed by fresh values (``init_variables``, the CLI's ``--init-missing``); unexpected and mis-shaped keys
    usually mean the wrong model name. ``fits`` is then the name of a model the checkpoint does fit, and
    ``fits_fresh`` how many of that model's leaves it lacks (> 0: it needs ``--init-missing`` too).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        misshaped: list[str] | None = None,
        fits: str | None = None,
        fits_fresh: int = 0,
    ):
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.misshaped = misshaped or []
        self.fits = fits
        self.fits_fresh = fits_fresh


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did, for the one-screen summary."""

    converted: list[str]
    ignored: dict[str, str]  # source key -> reason
    fresh: list[str]  # Flax leaves initialised fresh (not in the checkpoint)
    source_format: str  # 'official' or 'huggingface'
    num_params: int

    def summary(self) -> str:
        lines = [
            f"source naming: {self.source_format}",
            f"converted: {len(self.converted)} keys",
            f"ignored: {len(self.ignored)} keys",
        ]
        reasons: dict[str, int] = {}
        for reason in self.ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  {n:4d} x {reason}" for reason, n in sorted(reasons.items())]
        if self.fresh:
            modules = sorted({"/".join(p.split("/")[:-1]) for p in self.fresh})
            lines.append(f"freshly initialised (not in the checkpoint): {len(self.fresh)} leaves in")
            lines += [f"  {m}" for m in _collapse(modules)]
        lines.append(f"parameters: {self.num_params:,}")
        return "\n".join(lines)


def _collapse(modules: list[str], limit: int = 12) -> list[str]:
    """Module paths for the summary, shortened to their first two levels when there are many."""
    if len(modules) <= limit:
        return modules
    return sorted({"/".join(m.split("/")[:3]) for m in modules})


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints.


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint into a flat ``{name: array}`` dict.

    Supported: ``.pth``/``.pt``/``.bin`` (torch, loaded with ``weights_only=True``: no arbitrary unpickling; a dict
    whose weights sit under ``state_dict`` or ``model`` is unwrapped), ``.npz`` (keys may carry a ``state_dict/``
    prefix, as the parity fixtures do) and ``.safetensors``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                out = {}
                for key in data.files:
                    if key.startswith("state_dict/"):
                        out[key[len("state_dict/") :]] = data[key]
                    elif "/" not in key:
                        out[key] = data[key]
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise ConversionError(f"{path}: not a readable .npz checkpoint ({e})") from e
        return out
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable .safetensors checkpoint ({e})") from e
    if ext in (".pth", ".pt", ".bin", ".ckpt"):
        return _load_torch(path)
    raise ConversionError(
        f"{path}: unknown checkpoint extension {ext!r} (expected .pth, .pt, .bin, .npz, .safetensors)"
    )


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs PyTorch: pip install 'cffm-jax[torch]' (torch is used only to read .pth files)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals...
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[str(key)] = value.numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face names.

_HF_V4 = [  # transformers 4.x / published checkpoints
    (r"^encoder\.patch_embeddings\.(\d+)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^encoder\.layer_norm\.(\d+)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
]
_HF_V5 = [  # transformers 5.x module names
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^stages\.(\d+)\.layer_norm\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
]
_HF_BLOCK = {  # inside a block, both namings
    "layer_norm_1.": "norm1.",
    "layernorm_before.": "norm1.",
    "layer_norm_2.": "norm2.",
    "layernorm_after.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.q_proj.": "attn.q.",
    "attention.self.key.": "attn.k.",
    "attention.k_proj.": "attn.k.",
    "attention.self.value.": "attn.v.",
    "attention.v_proj.": "attn.v.",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "attention.self.sr.": "attn.sr.",
    "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.sequence_reduction.layer_norm.": "attn.norm.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.dense2.": "mlp.fc2.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
}


def is_huggingface(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys use Hugging Face SegFormer naming."""
    return any(re.match(r"^(segformer\.)?(encoder\.(block|patch_embeddings)|stages)\.", k) for k in state_dict)


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Renames Hugging Face SegFormer keys to the official MiT names (no prefix).

    Returns (renamed state dict, ignored keys with reasons). Separate key/value projections are concatenated into
    ``attn.kv`` (key rows first). A key that fits no rule is kept under its own name so that the converter reports it
    as unexpected.
    """
    out: dict[str, np.ndarray] = {}
    ignored: dict[str, str] = {}
    pending_kv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        name = key[len("segformer.") :] if key.startswith("segformer.") else key
        if re.match(IGNORED_HF_HEAD, name):
            ignored[key] = "Hugging Face decode/classification head (not the CFFM head)"
            continue
        if name.endswith("num_batches_tracked"):
            ignored[key] = "BatchNorm step counter (the momentum is fixed)"
            continue
        new = None
        for pattern, repl in _HF_V4 + _HF_V5:
            m = re.match(pattern, name)
            if m:
                rest = name[m.end() :]
                new = repl(m)
                if pattern.endswith(r"(\d+)\."):  # block: rename the inside
                    for old, canonical in _HF_BLOCK.items():
                        if rest.startswith(old):
                            rest = canonical + rest[len(old) :]
                            break
                new += rest
                break
        if new is None:
            out[key] = value
            continue
        m = re.match(r"^(.*)\.attn\.([kv])\.(weight|bias)$", new)
        if m:
            pending_kv.setdefault(f"{m[1]}.attn.kv.{m[3]}", {})[m[2]] = value
            continue
        out[new] = value
    for name, parts in pending_kv.items():
        if set(parts) != {"k", "v"}:
            missing = "value" if "k" in parts else "key"
            raise ConversionError(f"Hugging Face checkpoint: {name} has no matching {missing} projection")
        out[name] = np.concatenate([parts["k"], parts["v"]], axis=0)
    return out, ignored


# ---------------------------------------------------------------------------------------------------------
# Conversion.


def _flax_path(key: str) -> list[str]:
    """``a.b.0.c`` -> ``['a', 'b_0', 'c']``."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return parts


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _relaid(value: np.ndarray, target_shape: tuple[int, ...], leaf: str) -> np.ndarray | None:
    """A torch tensor re-laid for a Flax leaf, as a view (nothing copied); None when the shapes cannot correspond.

    Views keep the shape checks free, which lets a failed conversion try other models (``_closest_model``).
    """
    if leaf == "kernel":
        if value.ndim == 2 and len(target_shape) == 2:
            value = value.T
        elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0].T
        elif value.ndim == 4 and len(target_shape) == 4:
            value = value.transpose(2, 3, 1, 0)
        else:
            return None
    if tuple(value.shape) != tuple(target_shape):
        return None
    return value


def model_shapes(config) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """Flat ``{collection: {path: shape}}`` of a model's variables, without allocating them."""
    import jax

    model = build_model(config)
    args, kwargs = example_inputs(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return {col: {p: tuple(x.shape) for p, x in _flatten(tree).items()} for col, tree in shapes.items()}


def _expected_index_buffers(config) -> dict[str, np.ndarray]:
    """Canonical key -> the int64 index buffer our modules recompute (for checking a checkpoint's buffers)."""
    if config.arch == "mit":
        return {}
    from cffm_jax.models.cffm_attention import index_buffers

    buffers = index_buffers()
    out = {}
    for i in range(config.decoder_depth):
        for name, value in buffers.items():
            out[f"decode_head.decoder_focal.blocks.{i}.attn.{name}"] = value
    if config.arch == "cffmpp":
        out["decode_head.decoder_swin.blocks.0.attn.relative_position_index"] = buffers["relative_position_index"]
    return out


def canonicalize(state_dict: Mapping[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Official names with the prefixes the target model expects.

    Returns (state dict, ignored keys with reasons, source naming). For a MiT model the ``backbone.`` prefix of a
    CFFM checkpoint is stripped and its ``decode_head.*`` ignored; for a CFFM/CFFM++ model the keys of an ImageNet
    MiT checkpoint (no prefix) get ``backbone.`` and its ``head.*`` classifier is ignored.
    """
    ignored: dict[str, str] = {}
    source = "official"
    if is_huggingface(state_dict):
        state_dict, ignored = hf_to_official(state_dict)
        source = "huggingface"
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if config.arch == "mit":
            if key.startswith("decode_head."):
                ignored[key] = "decode head of a segmentation checkpoint (converting the backbone only)"
                continue
            name = key[len("backbone.") :] if key.startswith("backbone.") else key
        else:
            name = key if key.startswith(("backbone.", "decode_head.")) else f"backbone.{key}"
        bare = name[len("backbone.") :] if name.startswith("backbone.") else name
        if re.match(IGNORED_IMAGENET_HEAD, bare):
            ignored[key] = "ImageNet classification head of the MiT checkpoint"
            continue
        out[name] = value
    return out, ignored, source


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config,
    *,
    init_variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Converts a PyTorch state dict into Flax variables ``{'params': ..., 'batch_stats': ...}``.

    Args:
      state_dict: flat ``{official or Hugging Face name: array}`` (e.g. from ``load_state_dict``); float16/bfloat16
        values are cast to float32.
      config: the target model's config (``cffm_jax.models.model_config``).
      init_variables: fresh variables of the same model; leaves missing from the checkpoint are taken from here
        (e.g. a CFFM head on top of ImageNet MiT weights, or the CFFM++ prototype block on top of a CFFM
        checkpoint) instead of raising.
    Returns:
      the variables as nested dicts of float32 numpy arrays.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key at once.
    """
    return convert_state_dict_with_report(state_dict, config, init_variables=init_variables)[0]


@dataclasses.dataclass
class _Match:
    """Where each source key of a checkpoint lands in one model, before any value is copied."""

    filled: dict[str, dict[tuple[str, ...], np.ndarray]]  # collection -> path -> view in the Flax layout
    converted: list[str]
    ignored: dict[str, str]
    source: str
    unexpected: list[str]
    misshaped: list[str]
    unfilled: dict[str, dict[tuple[str, ...], tuple[int, ...]]]  # collection -> path -> shape no key fills


def _match(state_dict: Mapping[str, np.ndarray], config) -> _Match:
    """Maps a state dict onto ``config``'s variables by name and shape (shapes only: values stay views)."""
    canonical, ignored, source = canonicalize(state_dict, config)
    targets = model_shapes(config)
    params_t = targets.get("params", {})
    stats_t = targets.get("batch_stats", {})
    expected_buffers = _expected_index_buffers(config)

    filled: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    converted: list[str] = []
    unexpected: list[str] = []
    misshaped: list[str] = []
    targeted: set[tuple[str, tuple[str, ...]]] = set()  # leaves a mis-shaped key was meant for (not "missing")
    for key, value in canonical.items():
        value = np.asarray(value)
        reason = next((r for pattern, r in IGNORED if re.search(pattern, key)), None)
        if reason is not None:
            if key in expected_buffers and not np.array_equal(value, expected_buffers[key]):
                misshaped.append(f"{key}: index buffer differs from ours (a different window configuration?)")
            ignored[key] = reason
            continue
        path = _flax_path(key)
        leaf = path[-1]
        if leaf in ("running_mean", "running_var"):
            collection = "batch_stats"
            path = tuple(path[:-1]) + ("mean" if leaf == "running_mean" else "var",)
        else:
            collection = "params"
            if leaf == "weight":
                stem = tuple(path[:-1])
                path = stem + ("kernel",) if stem + ("kernel",) in params_t else stem + ("scale",)
            else:
                path = tuple(path)
        shapes = params_t if collection == "params" else stats_t
        if path not in shapes:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        if not np.issubdtype(value.dtype, np.floating):
            misshaped.append(f"{key}: dtype {value.dtype}, expected a floating-point tensor")
            continue
        new = _relaid(value, shapes[path], path[-1])
        if new is None:
            targeted.add((collection, path))
            misshaped.append(f"{key}: shape {tuple(value.shape)} does not fit {'/'.join(path)} {shapes[path]}")
            continue
        filled[collection][path] = new
        converted.append(key)

    unfilled = {
        collection: {
            path: shape
            for path, shape in shapes.items()
            if path not in filled[collection] and (collection, path) not in targeted
        }
        for collection, shapes in (("params", params_t), ("batch_stats", stats_t))
    }
    return _Match(filled, converted, ignored, source, unexpected, misshaped, unfilled)


def _closest_model(state_dict: Mapping[str, np.ndarray], config) -> tuple[str, int] | None:
    """The named model other than ``config.name`` that a checkpoint fits, and how many of its leaves it lacks.

    Fits means no unexpected and no mis-shaped key. The backbone's stage widths and depths (from the
    ``patch_embed*``/``block*`` keys) pick the size, so only the three architectures of that size are checked
    (each an abstract ``jax.eval_shape`` init, about a second). Of those that fit, the one converting the most keys
    wins, then ``config``'s architecture, then the fewest lacking leaves: a CFFM checkpoint asked for as CFFM++
    yields the CFFM++ model (its prototype branch fresh), not the bare CFFM. Heads keep ``config``'s class count.
    None when no named model fits (e.g. a custom-sized backbone).
    """
    from cffm_jax.models import ARCHS, model_config
    from cffm_jax.models.mit import VARIANTS

    backbone, _, _ = canonicalize(state_dict, model_config("mit_b0"))
    widths: dict[int, int] = {}
    blocks: dict[int, set[int]] = {}
    for key, value in backbone.items():
        if m := re.match(r"^patch_embed(\d+)\.proj\.weight$", key):
            widths[int(m[1])] = int(np.shape(value)[0])
        elif m := re.match(r"^block(\d+)\.(\d+)\.", key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(widths)
    found = {
        "embed_dims": tuple(widths[s] for s in stages),
        "depths": tuple(len(blocks.get(s, ())) for s in stages),
    }
    sizes = [name.split("_")[1] for name, variant in VARIANTS.items() if variant == found]
    overrides = {"num_classes": config.num_classes} if "num_classes" in config else {}
    best = None
    for size in sizes:
        for arch in ARCHS:
            name = f"{arch}_{size}"
            if name == config.name:
                continue
            candidate = model_config(name, **(overrides if arch != "mit" else {}))
            m = _match(state_dict, candidate)
            if m.unexpected or m.misshaped or not m.converted:
                continue
            lacking = sum(len(shapes) for shapes in m.unfilled.values())
            rank = (-len(m.converted), arch != config.arch, lacking)
            if best is None or rank < best[0]:
                best = (rank, name, lacking)
    return None if best is None else (best[1], best[2])


def convert_state_dict_with_report(
    state_dict: Mapping[str, np.ndarray],
    config,
    *,
    init_variables: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """As ``convert_state_dict``, also returning a ``ConversionReport``."""
    m = _match(state_dict, config)
    fresh: list[str] = []
    missing: list[str] = []
    init_flat = {col: _flatten(tree) for col, tree in (init_variables or {}).items()}
    for collection, shapes in m.unfilled.items():
        for path, shape in shapes.items():
            if init_variables is not None and path in init_flat.get(collection, {}):
                m.filled[collection][path] = np.asarray(init_flat[collection][path], dtype=np.float32)
                fresh.append(f"{collection}/{'/'.join(path)}")
            else:
                missing.append(f"{collection}/{'/'.join(path)} {shape}")

    if missing or m.unexpected or m.misshaped:
        # Only worth a look when the name looks wrong: keys that are merely missing are --init-missing's job.
        closest = _closest_model(state_dict, config) if m.unexpected or m.misshaped else None
        headline = f"Checkpoint does not match model {config.name!r}"
        if closest is not None:
            name, lacking = closest
            flags = f"--model {name}" + (" --init-missing" if lacking else "")
            fresh_note = f", with {lacking} leaves initialised fresh" if lacking else ""
            headline += f"; its keys and shapes fit model {name!r}{fresh_note} (convert with {flags})"
        parts = [headline + ":"]
        for title, items in (("missing", missing), ("unexpected", m.unexpected), ("mis-shaped", m.misshaped)):
            if items:
                parts.append(f"  {len(items)} {title}:")
                parts += [f"    {item}" for item in items]
        raise ConversionError(
            "\n".join(parts),
            missing=missing,
            unexpected=m.unexpected,
            misshaped=m.misshaped,
            fits=closest[0] if closest else None,
            fits_fresh=closest[1] if closest else 0,
        )

    filled = {
        col: {path: np.ascontiguousarray(value, dtype=np.float32) for path, value in flat.items()}
        for col, flat in m.filled.items()
    }
    variables = {col: _unflatten(flat) for col, flat in filled.items() if flat or col == "params"}
    variables.setdefault("batch_stats", {})
    num_params = int(sum(v.size for v in filled["params"].values()))
    report = ConversionReport(sorted(m.converted), m.ignored, sorted(fresh), m.source, num_params)
    return variables, report
