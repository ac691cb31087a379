"""The model card of an export: its ``README.md``, in the model hub's format.

A model card is Markdown with a YAML metadata block on top. The metadata names the library, the
base weights the learned parts are rebuilt on, the model config, and the evaluation figures of a
``results.json`` (``EvaluationResults.save``) in the hub's ``model-index`` form, so that the hub
and ``huggingface_hub.ModelCard`` read them. The text says how the model was made and how to load
it. Only plain data goes in: nothing here imports the hub library.
"""

from __future__ import annotations

from typing import Any

import yaml

CARD_NAME = "README.md"
LIBRARY_NAME = "prompt-ris"
TASK = {"type": "image-segmentation", "name": "Referring image segmentation"}
CARD_METRICS = ("mIoU", "oIoU", "P@0.5", "P@0.7", "P@0.9")  # in model-index, final mask
OUTPUT_NAMES = {"final": "final mask (SAM)", "coarse": "coarse mask (CLIP)"}


def model_card(
    meta: dict[str, Any],
    results: dict[str, Any] | None = None,
    *,
    name: str = "prompt-ris",
    description: str = "",
    how_made: str = "",
    load_from: str = "<owner>/<name>",
) -> str:
    """The text of a model card for an export.

    Args:
        meta: the export's ``config.json`` (``{"config": ..., "base_weights": ...}``).
        results: a ``results.json`` (``{"splits": {split: {output: {metric: value}}}}``), or
            None for a card without figures.
        name: the model's name in ``model-index``.
        description: a paragraph on what the model is.
        how_made: a paragraph on how it was made and how to remake it.
        load_from: the hub id or folder shown in the loading example.

    Returns:
        Markdown with a YAML metadata block.
    """
    config = meta.get("config", {})
    model_cfg = config.get("model", {})
    metadata: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "pipeline_tag": TASK["type"],
        "tags": ["referring-image-segmentation", "prompt-ris", "clip", "segment-anything"],
        "license": "mit",
        "base_weights": meta.get("base_weights", {}),
        "prompt_ris": {
            "format_version": meta.get("format_version", 1),
            "self_contained": bool(meta.get("self_contained", False)),
            "model": model_cfg,
        },
    }
    if results and results.get("splits"):
        metadata["model-index"] = [{"name": name, "results": _index_results(results)}]
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    switches = model_cfg.get("prompts", {}).get("switches", "mask + point + text")
    body = [
        f"# {name}",
        "",
        description
        or (
            "A Prompt-RIS model (Shang et al., CVPR 2024): a CLIP prompt-tuned with Cross-Modal "
            "Prompting makes a coarse mask of the object an expression refers to; its mask, "
            "point and text prompts drive a frozen SAM's mask decoder to the final mask."
        ),
        "",
        "## Use",
        "",
        "```python",
        "from prompt_ris import PromptRIS",
        f'model = PromptRIS.from_pretrained("{load_from}")',
        'mask = model.predict("image.png", "the red circle").masks[0]   # (H, W) bool',
        "```",
        "",
        "```bash",
        f'prompt-ris predict --checkpoint {load_from} --image image.png --text "the red circle" '
        "--out picture.png",
        "```",
        "",
        "## Base weights",
        "",
        "The file holds the learned parts only; they are rebuilt on these base weights (found "
        "by file name in the weights folder, `$PROMPT_RIS_WEIGHTS`):",
        "",
        *_base_weight_lines(meta.get("base_weights", {}), bool(meta.get("self_contained"))),
        "",
        f"Prompts given to SAM: `{switches}`; model preset `{model_cfg.get('preset', '?')}`.",
    ]
    if how_made:
        body += ["", "## How it was made", "", how_made]
    if results and results.get("splits"):
        body += ["", "## Results", "", results_table(results)]
    return f"---\n{front}---\n\n" + "\n".join(body) + "\n"


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of a ``results.json``: one row per split and output (percent)."""
    rows = [
        "| split | output | mIoU | oIoU | P@0.5 | P@0.7 | P@0.9 | expressions |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, outputs in results["splits"].items():
        for output in ("final", "coarse"):
            m = outputs.get(output)
            if m is None:
                continue
            figures = " | ".join(f"{m[key]:.2f}" for key in ("mIoU", "oIoU", "P@0.5", "P@0.7"))
            rows.append(
                f"| {split} | {OUTPUT_NAMES[output]} | {figures} | {m['P@0.9']:.2f} | "
                f"{m['num_expressions']} |"
            )
    return "\n".join(rows)


def _index_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``model-index`` results: one entry per split, the final mask's metrics."""
    entries = []
    for split, outputs in results["splits"].items():
        final = outputs.get("final")
        if final is None:
            continue
        dataset, _, part = split.partition(":")
        entries.append(
            {
                "task": dict(TASK),
                "dataset": {"type": dataset, "name": split, "split": part or "test"},
                "metrics": [
                    {
                        "type": metric,
                        "name": f"{metric} (final mask)",
                        "value": round(final[metric], 2),
                    }
                    for metric in CARD_METRICS
                    if metric in final
                ],
            }
        )
    return entries


def _base_weight_lines(base: dict[str, Any], self_contained: bool) -> list[str]:
    if self_contained:
        return ["- none needed: this export is self-contained (it stores the base weights too)"]
    return [
        f"- CLIP: `{base.get('clip_model')}` from `{base.get('clip_pretrained')}`",
        f"- SAM: `{base.get('sam_checkpoint')}`",
    ]
