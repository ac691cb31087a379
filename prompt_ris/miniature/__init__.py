"""The miniature world: synthetic scenes and the tiny CLIP and SAM foundations pretrained on them.

Real CLIP and SAM weights and the RefCOCO images cannot be downloaded everywhere, so the demo and
the tests run Prompt-RIS on a world small enough to make on a CPU (docs/design.md, "The embedded
default"):

- ``synthetic``: referring scenes of flat shapes with unambiguous expressions, written in the
  refer format (plus ``category_split.json``) so the real loaders read them;
- ``captions``: image-caption scenes for pretraining the tiny CLIP;
- ``clip_pretrain`` / ``sam_pretrain``: contrastive pretraining of the tiny CLIP and promptable
  segmentation pretraining of the tiny SAM, ``clip_probes`` / ``sam_probes``: what they learnt.
  ``scripts/pretrain_foundations.py`` runs all four and writes the weight files in the formats of
  the real CLIP and SAM checkpoints.

The core of ``prompt_ris`` never imports this package: it sees the miniature world only as
files (refer data, weight files) named by configs. Scripts and tests import it.
"""
