"""The page of ``prompt-ris app`` (Gradio Blocks) and how it is served.

The page: an image (upload, one of the example scenes, or a new synthetic scene), expressions
one per line, the threshold and the prompt switches (mask / point / text) as live controls; for
each expression, in its own colour, the coarse mask as a heat map with the point SAM was given,
the final mask and, where the scene knows it, the IoU with the ground truth. A bad input gets a
one-line message in the page. Requests go through Gradio's queue with bounded concurrency; the
model answers one at a time (``answers.Answerer``). The ``segment`` API (``gradio_client``)
takes an image file, the expressions, the threshold and the switches and returns the masks as
COCO RLE.
"""

from __future__ import annotations

import random
from typing import Any

import gradio as gr

from prompt_ris.app.answers import (
    Answerer,
    InputProblem,
    check_image,
    overview,
    parse_expressions,
    parse_switches,
    pictures,
    read_image,
    results_table,
)
from prompt_ris.app.scenes import Scene, example_scenes, new_scene
from prompt_ris.prompt_switches import PROMPT_TYPES

TITLE = "Prompt-RIS: referring image segmentation"
CONCURRENCY = 2  # requests worked on at once; the rest wait in the queue
QUEUE_SIZE = 64  # requests waiting at most; more are turned away with a message
MAX_FILE_SIZE = "20mb"
INTRO = (
    "Type what to segment, one expression per line. For each one: CLIP's **coarse mask** (heat "
    "map) with the **point** SAM was given, and SAM's **final mask**, each expression in its own "
    "colour; with a scene's ground truth, the IoU. Switch the prompts off to see what each does."
)


def build_app(answerer: Answerer, scenes: list[Scene] | None = None) -> gr.Blocks:
    """The page, answering with ``answerer``; ``scenes`` are the examples (default: the
    committed ones)."""
    scenes = example_scenes() if scenes is None else scenes
    default = [name for name in PROMPT_TYPES if name in answerer.default_switches]

    def run(scene, text, threshold, switches):  # noqa: ANN001, ANN202 - Gradio callback
        try:
            if scene is None:
                raise InputProblem("no image yet; upload one, pick an example or press 'new scene'")
            image = check_image(scene["image"])
            answer = answerer.answer(
                image, parse_expressions(text), float(threshold), parse_switches(switches),
                scene.get("truths"),
            )  # fmt: skip
        except InputProblem as err:
            return None, [], "", _status(str(err), error=True), ""
        reuse = "computed" if answer.embedded else "reused"
        note = " ".join(answer.notes)
        status = f"answered in {answer.seconds * 1000:.0f} ms (SAM image embedding {reuse}). {note}"
        return (
            overview(image, answer), pictures(image, answer, scene.get("truths")),
            results_table(answer), _status(status.strip(), error=bool(note)), answer.masks_json(),
        )  # fmt: skip

    def load_scene(scene: Scene) -> tuple[Any, ...]:
        state = {"image": scene.image, "truths": scene.truths, "name": scene.name}
        return state, scene.image, "\n".join(scene.expressions), _status(f"{scene.name} loaded")

    def pick_example(evt: gr.SelectData) -> tuple[Any, ...]:
        return load_scene(scenes[evt.index])

    def draw_new_scene() -> tuple[Any, ...]:
        return load_scene(new_scene(random.randrange(10**6)))

    def upload(path: str | None) -> tuple[Any, ...]:
        """The uploaded file as the scene, or its problem; the file box is emptied again."""
        if path is None:
            return None, None, gr.update(), _status(""), None
        try:
            image = read_image(path)
        except InputProblem as err:
            return None, None, gr.update(), _status(str(err), error=True), None
        state = {"image": image, "truths": {}, "name": "upload"}
        return state, image, gr.update(), _status("image uploaded; press Segment"), None

    def segment_api(path, text, threshold, switches):  # noqa: ANN001, ANN202 - API endpoint
        """Masks (COCO RLE, JSON) for an image file and expressions, one per line."""
        try:
            image = read_image(path) if path else check_image(None)
            answer = answerer.answer(
                image, parse_expressions(text), float(threshold), parse_switches(switches)
            )
        except InputProblem as err:
            raise gr.Error(str(err)) from None
        return answer.masks_json()

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        scene = gr.State(None)
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                shown = gr.Image(label="image", interactive=False, type="numpy", format="png",
                                 height=260, elem_id="image")  # fmt: skip
                examples = gr.Gallery(
                    [(s.image, s.name) for s in scenes], label="example scenes (click one)",
                    columns=4, height=140, allow_preview=False, elem_id="examples",
                )  # fmt: skip
                with gr.Row():
                    new_button = gr.Button("new scene", elem_id="new-scene")
                    uploader = gr.File(label="upload an image", file_types=["image"],
                                       type="filepath", elem_id="upload")  # fmt: skip
                text = gr.Textbox(label="expressions, one per line", lines=3,
                                  placeholder="the red circle", elem_id="expressions")  # fmt: skip
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="threshold",
                                      elem_id="threshold")  # fmt: skip
                switches = gr.CheckboxGroup(
                    list(PROMPT_TYPES), value=default, label="prompts given to SAM",
                    elem_id="switches",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                result = gr.Image(label="final masks, one colour per expression (dots: points)",
                                  type="numpy", format="png", interactive=False,
                                  height=260, elem_id="overview")  # fmt: skip
                table = gr.Markdown("", elem_id="table")
                gallery = gr.Gallery(label="image | coarse mask + point | final mask | truth",
                                     columns=1, height=420, object_fit="contain",
                                     elem_id="pictures")  # fmt: skip
                masks = gr.Textbox(label="masks (COCO RLE, JSON)", lines=2, max_lines=4,
                                   elem_id="masks")  # fmt: skip
        outputs = [result, gallery, table, status, masks]
        inputs = [scene, text, threshold, switches]
        loaded = [scene, shown, text, status]
        examples.select(pick_example, None, loaded, api_name=False).then(
            run, inputs, outputs, api_name=False
        )
        new_button.click(draw_new_scene, None, loaded, api_name=False).then(
            run, inputs, outputs, api_name=False
        )
        uploader.upload(upload, uploader, [*loaded, uploader], api_name=False)
        button.click(run, inputs, outputs, api_name=False)
        text.submit(run, inputs, outputs, api_name=False)
        threshold.release(run, inputs, outputs, api_name=False)
        switches.change(run, inputs, outputs, api_name=False)
        api_inputs = [
            gr.File(visible=False, type="filepath"), gr.Textbox(visible=False),
            gr.Number(visible=False), gr.CheckboxGroup(list(PROMPT_TYPES), visible=False),
        ]  # fmt: skip
        api_button = gr.Button(visible=False)
        api_button.click(segment_api, api_inputs, gr.Textbox(visible=False), api_name="segment")
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return app


def _status(message: str, error: bool = False) -> str:
    return f"**error:** {message}" if error and message else message


def serve(
    answerer: Answerer,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> gr.Blocks:
    """Serve the page on ``host:port`` (loopback by default; no public link unless ``share``)."""
    app = build_app(answerer)
    app.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
        max_file_size=MAX_FILE_SIZE, show_error=True, quiet=not block,
    )  # fmt: skip
    return app

