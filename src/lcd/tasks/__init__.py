"""ICL task families with labelled latent concepts."""

from lcd.tasks.base import ICLTask
from lcd.tasks.sparse_regression import FunctionMixtureTask, SparseRegressionTask, make_bases

__all__ = ["FunctionMixtureTask", "ICLTask", "SparseRegressionTask", "make_bases"]
