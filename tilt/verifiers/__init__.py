"""Ecosystem verifiers, registered into ``tilt.rewards.REWARDS`` on import.

- ``code_exec``: model-written Python against a row's tests in a sandbox (``sandbox.py``);
- ``math_verify`` and ``format``: maths answers via the ``math-verify`` package, tag format (``math.py``);
- reward models: ``reward_model.py`` (``"reward_model:<path>"`` names);
- reasoning-gym rows and their ``score_answer`` (``reasoning_gym_source.py``).

Heavy packages (math-verify, transformers, reasoning-gym) are imported only when used. The reward
modules register when ``tilt.rewards`` is imported; ``tasks.py`` holds the task-mix entries
(``rg_chain_sum``, ``code_mul``) that ``tilt.tasks`` registers.
"""
