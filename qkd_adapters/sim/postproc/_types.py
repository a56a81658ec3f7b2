"""Array type aliases shared by the post-processing modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

U8Array = npt.NDArray[np.uint8]
I32Array = npt.NDArray[np.int32]
I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]
AnyArray = npt.NDArray[Any]
Int = int | np.signedinteger[Any]  # a scalar inside numba kernels (Python int or numpy int64)
