"""Applications built on the model: the `moss-speech` command line (`cli`), the Gradio demo (`demo`), spoken-QA
evaluation and transcription scores (`evaluation`, with the independent recognizer of `recognition`) and the
layer-wise speech/text similarity analysis (`analysis`).
"""
