"""glibc heap policies: what a long run does so that freed layers and tokenized text leave its resident memory."""

from __future__ import annotations

import gc


def return_freed_memory_promptly() -> None:
    """Have glibc serve large blocks (>= 16 MiB: a large model's weight matrices) with mmap, so that a freed layer
    goes back to the system.

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed; a layer's
    tensors then come from the heap, which fragments, and a streaming run's resident memory creeps up
    with every layer. It must be set before the first large blocks: set after tokenizing and
    loading, some runs had already grown a 957 MiB heap (780 MiB of it free, glibc mallinfo2), whose
    holes later tensors filled and kept resident until the next trim, and peaked ~250 MiB higher
    than the others. Not lower than 16 MiB: at 1 MiB every activation-sized temporary of a forward
    pass was a fresh mmap, page faults and all, and SmolLM2-135M pruned 1.8x slower streaming than in
    memory (1.1x at 16 MiB, for a peak 0-110 MiB higher on the 12-layer synthetic checkpoint). No-op
    where glibc is not the allocator.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap(collect: bool = True) -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``), after a garbage collection if ``collect``.

    Tokenizing calibration and evaluation text leaves tens of MB of freed but resident heap behind,
    which would otherwise count in a streaming run's peak for the whole run. A dropped layer needs no
    collection (its tensors go when their last reference does), and a full one per layer cost SmolLM2
    5 s in 30 layers. No-op where glibc is not the allocator.
    """
    if collect:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
