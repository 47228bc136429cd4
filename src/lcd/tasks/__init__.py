"""ICL task families with labelled latent concepts."""

from lcd.tasks.base import ICLTask
from lcd.tasks.bitwise import BitwiseTask
from lcd.tasks.pos import POSTask
from lcd.tasks.prompts import ICLPrompt, PromptTemplate, TextICLTask, make_prompts
from lcd.tasks.sparse_regression import FunctionMixtureTask, SparseRegressionTask, make_bases

__all__ = [
    "FunctionMixtureTask",
    "ICLTask",
    "SparseRegressionTask",
    "make_bases",
    "BitwiseTask",
    "ICLPrompt",
    "POSTask",
    "PromptTemplate",
    "TextICLTask",
    "make_prompts",
]
