"""``python -m llamarun.kernels``: build the CPU kernels now (set-up does this) and say whether they work.

Never fails the set-up: without a compiler llamarun runs on its portable torch path.
"""

from . import available, reason

print(f"llamarun kernels: {'ready' if available() else 'unavailable, using the portable path'}: {reason()}")
