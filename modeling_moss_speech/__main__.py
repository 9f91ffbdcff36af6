"""`python -m modeling_moss_speech ...` runs the `moss-speech` console script (same commands and options)."""

import sys

from modeling_moss_speech.apps.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
