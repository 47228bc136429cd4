"""The synthetic task family: mixtures of sparse linear regressions, function families, curricula.

The reference algorithms (that know, or do not know, the latent concept) are in
:mod:`lcd.tasks.synthetic.references`.
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
