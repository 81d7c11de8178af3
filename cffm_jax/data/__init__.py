"""VSPW data for CFFM / CFFM++ (SPEC.md section 10).

Modules: ``vspw`` (layout, labels, clip sampling, frame sources), ``transforms`` (numpy train/test
transforms), ``pipeline`` (grain training pipeline, evaluation readers), ``synthetic`` (small synthetic
dataset), ``validate`` (dataset checker CLI), ``tfds_vspw`` (TFDS array_record builder; imports
tensorflow_datasets, so it is not imported here).
"""

from cffm_jax.data.vspw import DatasetError, eval_clip_indices, train_clip_indices

__all__ = ["DatasetError", "eval_clip_indices", "train_clip_indices"]
