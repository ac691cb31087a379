"""``prompt-ris app``: try a trained model in the browser (Gradio; ``pip install -e .[app]``).

``scenes`` holds the example scenes and renders new ones, ``answers`` turns an image and its
expressions into masks and pictures (one SAM embedding per image), ``server`` lays out the page
and serves it. Only ``server`` imports Gradio.
"""
