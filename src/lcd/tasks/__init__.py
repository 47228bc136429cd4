"""ICL task families with labelled latent concepts: :mod:`lcd.tasks.synthetic` and :mod:`lcd.tasks.text`.

Configs name them by these short paths, e.g. ``class_path: lcd.tasks.SparseRegressionTask``.
"""

from lcd.tasks.synthetic import (
    ActiveDimsCurriculum,
    ConceptCurriculum,
    Curriculum,
    FunctionMixtureTask,
    ICLTask,
    SparseRegressionTask,
    make_bases,
)
from lcd.tasks.text import BitwiseTask, ICLPrompt, POSTask, PromptTemplate, TextICLTask, make_prompts

__all__ = [
    "ActiveDimsCurriculum",
    "BitwiseTask",
    "ConceptCurriculum",
    "Curriculum",
    "FunctionMixtureTask",
    "ICLPrompt",
    "ICLTask",
    "POSTask",
    "PromptTemplate",
    "SparseRegressionTask",
    "TextICLTask",
    "make_bases",
    "make_prompts",
]
