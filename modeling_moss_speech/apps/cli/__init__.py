"""The `moss-speech` console script (`main.main`; one module per command); `python -m modeling_moss_speech` runs it
too."""
