"""Lightning callbacks that add lcd's measurements to any run (see the YAML fragments in callbacks/)."""

from lcd.callbacks.decodability import ConceptDecodability
from lcd.callbacks.progress import ProgressLog

__all__ = ["ConceptDecodability", "ProgressLog"]
