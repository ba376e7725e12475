"""The compiled ops and their plain-torch twins.

* :mod:`mustafar.ops.dispatch` — the one dispatch point from Python to compiled code (validation,
  backend choice: CUDA kernel, C++ CPU kernel or the reference).
* :mod:`mustafar.ops.reference` — the plain-torch reference of every op (the semantics).
* :mod:`mustafar.ops.build` — builds/loads the ``torch.utils.cpp_extension`` library from ``csrc/``.

``mustafar.ops.<op>`` is the public spelling; it is :mod:`mustafar.ops.dispatch`'s function.
"""

from mustafar.ops.dispatch import (append_decode, backend, decode_bitmap, encode_bitmap, prune_encode_topk,
                                   sparse_decode)

__all__ = ["encode_bitmap", "decode_bitmap", "prune_encode_topk", "sparse_decode", "append_decode", "backend"]
