"""Test-wide settings. Triton kernels run on CPU through the interpreter, which Triton reads when
it is first imported: set it before any test module imports triton."""

import os

os.environ["TRITON_INTERPRET"] = "1"
