"""The `moss-speech` console script (`main.main`); `python -m modeling_moss_speech` runs it too."""
