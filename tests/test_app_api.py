"""The app's ``segment`` API called through ``gradio_client`` as a script would, the
embedding cache, and the load script's run of many clients at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_server import served_app
from repo_scripts import REPO, load_script

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e .[app]")

SCENE = REPO / "examples" / "scenes" / "scene_0.png"


@pytest.fixture(scope="module")
def served():  # noqa: ANN201
    with served_app() as app:
        yield app


def test_segment_api_through_gradio_client_gives_predicts_masks(served) -> None:  # noqa: ANN001
    from gradio_client import Client, handle_file
    from PIL import Image

    from prompt_ris.data.rle import decode_rle

    client = Client(served.url, verbose=False)
    texts = ["the red triangle", "the blue shape"]
    out = client.predict(
        handle_file(str(SCENE)), "\n".join(texts), 0.4, ["mask", "point"], api_name="/segment"
    )
    from prompt_ris import PromptSwitches

    image = np.asarray(Image.open(SCENE).convert("RGB"))
    want = served.model.predict(
        image, texts, threshold=0.4, switches=PromptSwitches.parse("mask + point")
    )
    entries = json.loads(out)
    assert [e["expression"] for e in entries] == texts
    for k, entry in enumerate(entries):
        np.testing.assert_array_equal(decode_rle(entry["mask"]), want.masks[k])
    with pytest.raises(Exception, match="no expression"):
        client.predict(handle_file(str(SCENE)), " \n ", 0.5, ["mask"], api_name="/segment")
    with pytest.raises(Exception, match="every prompt is switched off"):
        client.predict(handle_file(str(SCENE)), "the red shape", 0.5, [], api_name="/segment")


def test_second_answer_on_an_image_reuses_its_sam_embedding(served) -> None:  # noqa: ANN001
    from prompt_ris.app.scenes import example_scenes

    scene = example_scenes()[2]
    before = served.answerer.embeddings_computed
    first = served.answerer.answer(scene.image, scene.expressions[:1])
    second = served.answerer.answer(scene.image, scene.expressions, threshold=0.3)
    assert first.embedded and not second.embedded
    assert served.answerer.embeddings_computed == before + 1
    np.testing.assert_array_equal(
        second.masks, served.model.predict(scene.image, scene.expressions, threshold=0.3).masks
    )


def test_load_script_all_answered_correctly(served) -> None:  # noqa: ANN001
    load_test = load_script("scripts/load_test_app.py")
    report = load_test.run(served.url, requests=20, clients=5)
    assert report["answered"] == 20 and report["correct"] == 20
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"]
