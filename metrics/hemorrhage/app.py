import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("hemorrhage", "answers")
launch_gradio_widget(module)
