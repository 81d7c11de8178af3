"""Parity checker: runs our model on a fixture made by the official code and compares every output it holds.

    python -m cffm_jax.parity FIXTURE.npz [FIXTURE.npz ...] [--atol 2e-5] [--rtol 1e-5] [--matmul-precision P]

Fixture format (``tests/fixtures/README.md``): ``state_dict/<official key>`` (float32 or float16), ``input/clip``
(B, T, 3, H, W), optional ``input/prototypes`` (B, Kp, E), ``output/<name>`` in PyTorch layout or
``output/<name>_sampled`` (..., C, S) with positions ``output/<name>_sampled_y``/``_x``, and a JSON ``meta`` with the
model configuration. The model is built from ``meta`` and the state dict is converted with the same code path as
``convert_torch_weights.py``. An output passes when max |ours - ref| <= atol + rtol * max |ref|. The exit status is
non-zero if any output fails or a fixture cannot be interpreted. The model's float32 products run at
``--matmul-precision`` (the model config field; default 'highest', the official numbers on every backend);
'default' shows what XLA's own precision gives: on an H100 (TF32) errors of 2.9e-3 to 5.5e-3 on the tiny fixtures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cffm_jax import xla_options
from cffm_jax.checkpoint import config_from_json
from cffm_jax.convert import convert_state_dict
from cffm_jax.models import build_model, model_config
from cffm_jax.models.cffm import upsample_logits
from cffm_jax.models.layers import MATMUL_PRECISIONS


class FixtureError(ValueError):
    """A fixture this checker cannot interpret."""


@dataclasses.dataclass
class Result:
    fixture: str
    output: str
    shape: tuple[int, ...]
    max_abs_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_err <= self.tolerance)


# The official decoder settings this implementation hard-codes (SPEC 4.3), checked against a fixture's meta.
_FIXED_HEAD = {
    "window_size": 7,
    "focal_level": 2,
    "focal_window": 5,
    "expand_size": 3,
    "focal_l_clips": [1, 2, 3],
    "focal_kernel_clips": [7, 5, 3],
    "num_clips": 4,
    "align_corners": False,
}


def config_from_meta(meta: dict[str, Any]):
    """The model config described by a fixture's ``meta``."""
    try:
        bb = meta["backbone"]
        fields = {k: tuple(bb[k]) for k in ("embed_dims", "depths", "num_heads", "sr_ratios", "mlp_ratios")}
        head = meta.get("decode_head")
        if head is None:
            return model_config("mit_b0", **fields)
        for key, value in _FIXED_HEAD.items():
            if key in head and head[key] != value:
                raise FixtureError(f"meta.decode_head.{key} = {head[key]!r}; this implementation supports {value!r}")
        if tuple(head["in_channels"]) != fields["embed_dims"]:
            raise FixtureError("meta.decode_head.in_channels differs from the backbone's embed_dims")
        arch = "cffmpp" if "cluster_block" in head or "prototype" in meta.get("model", "") else "cffm"
        extra = {}
        if arch == "cffmpp":
            extra["prototype_num_heads"] = head.get("cluster_block", {}).get("num_heads", 8)
        return model_config(
            f"{arch}_b0",
            **fields,
            decoder_embed_dim=head["embed_dim"],
            decoder_depth=head["decoder_depth"],
            decoder_num_heads=head.get("decoder_num_heads", 8),
            num_classes=head["num_classes"],
            **extra,
        )
    except KeyError as e:
        raise FixtureError(f"meta lacks {e}") from e


def _torch_layout(x: jax.Array) -> np.ndarray:
    """Channels-last -> PyTorch layout (channels before the two spatial axes)."""
    return np.moveaxis(np.asarray(x, dtype=np.float32), -1, -3)


@functools.lru_cache(maxsize=8)
def _runner(config_json: str):
    """A jitted forward pass returning the intermediates, one per model config (so repeated checks compile once),
    with the XLA options evaluation and training use (``cffm_jax.xla_options``: cuBLAS GEMMs at 'highest' on GPUs)."""
    model = build_model(config_from_json(json.loads(config_json)))
    return jax.jit(
        lambda variables, clip, kwargs: model.apply(variables, clip, mutable=["intermediates"], **kwargs),
        compiler_options=xla_options.compiler_options("default", model.matmul_precision),
    )


def fixture_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official state dict held by a fixture's arrays (``state_dict/<official key>``, prefix removed)."""
    return {k.removeprefix("state_dict/"): v for k, v in arrays.items() if k.startswith("state_dict/")}


def model_outputs(arrays: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Runs the model on the fixture input; returns our value of every fixture output name (PyTorch layout)."""
    state_dict = fixture_state_dict(arrays)
    if not state_dict:
        raise FixtureError("no state_dict/* entries")
    if "input/clip" not in arrays:
        raise FixtureError("no input/clip")
    variables = convert_state_dict(state_dict, config)
    clip = jnp.asarray(np.moveaxis(arrays["input/clip"].astype(np.float32), 2, -1))  # (B, T, H, W, 3)
    b, t, h, w, _ = clip.shape
    if config.arch == "mit":
        frames = clip.reshape(b * t, h, w, 3)
        stages, _ = _runner(config.to_json())(variables, frames, {})
        return {
            f"backbone_stage{s + 1}": _torch_layout(x).reshape(b, t, *x.shape[-1:], *x.shape[1:3])
            for s, x in enumerate(stages)
        }
    kwargs = {}
    if config.arch == "cffmpp":
        if "input/prototypes" not in arrays:
            raise FixtureError("a CFFM++ fixture needs input/prototypes")
        kwargs["prototypes"] = jnp.asarray(arrays["input/prototypes"].astype(np.float32))
    out, state = _runner(config.to_json())(variables, clip, kwargs)
    inter = state["intermediates"]
    head = inter["decode_head"]

    def frames(x):  # (B*T, h, w, C) -> (B, T, C, h, w)
        x = _torch_layout(x)
        return x.reshape(b, t, *x.shape[1:])

    ours = {f"backbone_stage{s}": frames(inter["backbone"][f"stage{s}"][0]) for s in range(1, 5)}
    ours["head_perframe_logits"] = np.moveaxis(np.asarray(head["perframe_logits"][0]), -1, 2)
    ours["head_logits"] = _torch_layout(out)
    ours["logits_full"] = _torch_layout(upsample_logits(out, (h, w)))
    if "focal_in" in head:
        ours["head_focal_in"] = np.moveaxis(np.asarray(head["focal_in"][0]), -1, 2)
        ours["head_focal_out_target"] = _torch_layout(head["focal_out_target"][0])
        ours["head_logits_cffm"] = _torch_layout(head["logits_cffm"][0])
    if "cluster_feats" in head:
        ours["head_cluster_feats"] = _torch_layout(head["cluster_feats"][0])
        ours["head_logits_cluster"] = _torch_layout(head["logits_cluster"][0])
    return ours


def check_arrays(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    name: str = "fixture",
    atol: float = 2e-5,
    rtol: float = 1e-5,
    matmul_precision: str = "highest",
) -> list[Result]:
    """Compares every ``output/*`` of a loaded fixture with our model (its float32 products at
    ``matmul_precision``, the model config field); raises ``FixtureError`` if it cannot."""
    config = config_from_meta(meta)
    config.matmul_precision = matmul_precision
    ours = model_outputs(arrays, config)
    outputs = sorted(k for k in arrays if k.startswith("output/") and not k.endswith(("_sampled_y", "_sampled_x")))
    if not outputs:
        raise FixtureError("no output/* entries")
    results = []
    for key in outputs:
        out_name = key[len("output/") :]
        ref = arrays[key].astype(np.float32)
        if out_name.endswith("_sampled"):
            base = out_name[: -len("_sampled")]
            if base not in ours:
                raise FixtureError(f"unknown output {key!r} (known: {', '.join(sorted(ours))})")
            ys, xs = arrays.get(f"{key}_y"), arrays.get(f"{key}_x")
            if ys is None or xs is None:
                raise FixtureError(f"{key} lacks its positions {key}_y / {key}_x")
            value = ours[base][..., ys.astype(np.int64), xs.astype(np.int64)]
        else:
            if out_name not in ours:
                raise FixtureError(f"unknown output {key!r} (known: {', '.join(sorted(ours))})")
            value = ours[out_name]
        if value.shape != ref.shape:
            raise FixtureError(f"{key}: reference shape {ref.shape}, ours {value.shape}")
        err = float(np.max(np.abs(value - ref))) if ref.size else 0.0
        results.append(Result(name, out_name, ref.shape, err, atol + rtol * float(np.max(np.abs(ref)))))
    return results


def check_fixture(path: str, atol: float = 2e-5, rtol: float = 1e-5, matmul_precision: str = "highest") -> list[Result]:
    """Loads a fixture ``.npz`` and compares every output (see ``check_arrays``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "meta"}
            if "meta" not in data.files:
                raise FixtureError(f"{path}: no meta entry")
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError) as e:
        if isinstance(e, FixtureError):
            raise
        raise FixtureError(f"{path}: not a readable fixture ({e})") from e
    try:
        return check_arrays(arrays, meta, name=str(path), atol=atol, rtol=rtol, matmul_precision=matmul_precision)
    except FixtureError as e:
        raise FixtureError(f"{path}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="fixture .npz files")
    parser.add_argument("--atol", type=float, default=2e-5)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="highest",
        help="the model's float32 matmul precision; 'default' = XLA's (TF32 on GPUs: expect failures there)",
    )
    args = parser.parse_args(argv)
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    failed = False
    for path in args.fixtures:
        try:
            results = check_fixture(path, args.atol, args.rtol, args.matmul_precision)
        except FixtureError as e:
            print(f"FAIL {e}")  # noqa: T201
            failed = True
            continue
        print(f"{path}")  # noqa: T201
        print(f"  {'output':<28} {'shape':<22} {'max abs err':>12} {'tolerance':>10}  status")  # noqa: T201
        for r in results:
            status = "ok" if r.ok else "FAIL"
            failed |= not r.ok
            print(f"  {r.output:<28} {str(r.shape):<22} {r.max_abs_err:>12.3e} {r.tolerance:>10.2e}  {status}")  # noqa: T201
    print("FAILED" if failed else "all outputs within tolerance")  # noqa: T201
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
