"""The synthetic task family: mixtures of sparse linear regressions (and function families), curricula,
and the reference algorithms that know or do not know the latent concept.
"""

from lcd.tasks.synthetic.base import ICLTask
from lcd.tasks.synthetic.curriculum import ActiveDimsCurriculum, ConceptCurriculum, Curriculum
from lcd.tasks.synthetic.sparse_regression import FunctionMixtureTask, SparseRegressionTask, make_bases

__all__ = [
    "ActiveDimsCurriculum",
    "ConceptCurriculum",
    "Curriculum",
    "FunctionMixtureTask",
    "ICLTask",
    "SparseRegressionTask",
    "make_bases",
]
