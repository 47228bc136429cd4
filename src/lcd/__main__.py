"""``python -m lcd`` is the ``lcd`` command."""

from lcd.cli import console

console()
