"""Miniature foundation models for the embedded demo: a tiny CLIP pretrained contrastively on
synthetic captions and a tiny SAM pretrained for promptable segmentation (docs/design.md, "The
embedded default").

``clip_pretrain`` and ``sam_pretrain`` train them, ``clip_probes`` and ``sam_probes`` measure
what they learnt; ``scripts/pretrain_foundations.py`` runs all four and writes the weight files
in the formats of the real CLIP and SAM checkpoints.
"""
