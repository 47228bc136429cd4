"""The text task family: k-shot prompts of natural ICL tasks (bitwise arithmetic, part-of-speech tagging)."""

from lcd.tasks.text.bitwise import BitwiseTask
from lcd.tasks.text.pos import POSTask
from lcd.tasks.text.prompts import ICLPrompt, PromptTemplate, TextICLTask, make_prompts

__all__ = ["BitwiseTask", "ICLPrompt", "POSTask", "PromptTemplate", "TextICLTask", "make_prompts"]
