"""Checkpoint tooling around the Hugging Face Hub: the release converters (`convert_moss_speech_original_to_hf`,
`convert_campplus_onnx`), the remote-code export (`remote_code`), model cards and upload (`publish`), and what a
checkpoint directory holds (`checkpoint_info`).
"""
