"""The hemorrhage Space: pick a model and a modification and watch it bleed.

Run locally with ``python spaces/hemorrhage/app.py`` (or ``hemorrhage-hf space``); it serves on 127.0.0.1:7860.
On Hugging Face Spaces the runtime sets GRADIO_SERVER_NAME, and this file is the Space's entry point.
"""

from hemorrhage_hf.space import build_demo, launch

demo = build_demo()

if __name__ == "__main__":
    launch(demo)
