"""Convert PyTorch weights into a cffm-jax weights directory.

Usage:
  python convert_torch_weights.py SRC DST --model NAME [--init-missing] [--num-classes K] [--overwrite]

SRC: an official CFFM / CFFM++ checkpoint (``.pth``), a SegFormer ImageNet backbone (``mit_b*.pth``), a Hugging Face
SegFormer checkpoint (``pytorch_model.bin`` / ``model.safetensors``), or an ``.npz`` state dict.
NAME: ``mit_b0``..``mit_b5``, ``cffm_b0``..``cffm_b5`` or ``cffmpp_b0``..``cffmpp_b5``.
``--init-missing`` fills what the checkpoint lacks with a fresh initialisation (a CFFM head on an ImageNet
backbone, or the CFFM++ prototype block on a CFFM checkpoint); the summary lists those parts.
DST is written as ``model.json`` + an orbax ``variables/`` checkpoint, loadable by training (``--config.init_from``),
evaluation and prediction.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cffm_jax.checkpoint import save_variables
from cffm_jax.convert import ConversionError, convert_state_dict_with_report, load_state_dict
from cffm_jax.models import MODEL_NAMES, init_variables, model_config


def _hint(error: Exception, args: argparse.Namespace) -> str:
    """The one remedy worth repeating below a long key list, or ''.

    A model that the checkpoint fits comes first (the key list is then noise); ``--init-missing`` only when missing
    leaves are the whole problem, since it cannot fix an unexpected or mis-shaped key.
    """
    fits = getattr(error, "fits", None)
    if fits:
        flags = f"--model {fits}" + (" --init-missing" if getattr(error, "fits_fresh", 0) else "")
        return f"({args.src} fits model {fits}: convert it with {flags})"
    only_missing = getattr(error, "missing", None) and not (error.unexpected or error.misshaped)
    if only_missing and not args.init_missing:
        return "(use --init-missing to initialise the missing parts freshly)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="PyTorch / Hugging Face / npz checkpoint")
    parser.add_argument("dst", help="output weights directory")
    parser.add_argument("--model", required=True, choices=MODEL_NAMES, metavar="NAME", help="target model")
    parser.add_argument("--num-classes", type=int, default=None, help="override the number of classes (124)")
    parser.add_argument("--init-missing", action="store_true", help="freshly initialise what SRC lacks")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init-missing")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    config = model_config(args.model, **overrides)
    try:
        state_dict = load_state_dict(args.src)
        init = init_variables(config, args.seed) if args.init_missing else None
        variables, report = convert_state_dict_with_report(state_dict, config, init_variables=init)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        hint = _hint(e, args)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    try:
        save_variables(
            args.dst,
            variables,
            config,
            metadata={"source": str(args.src), "fresh": report.fresh, "source_format": report.source_format},
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.dst} ({args.model})")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
