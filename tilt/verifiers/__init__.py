"""Ecosystem verifiers, registered into ``tilt.rewards.REWARDS`` on import.

- ``code_exec``: model-written Python against a row's tests in a sandbox (``sandbox.py``);
- ``math_verify`` and ``format``: maths answers via the ``math-verify`` package, tag format (``math.py``);
- reward models: ``reward_model.py`` (``"reward_model:<path>"`` names);
- reasoning-gym rows and their ``score_answer`` (``reasoning_gym_source.py``).

Heavy packages (math-verify, transformers, reasoning-gym) are imported only when used.
"""
from tilt.verifiers import code_exec  # noqa: F401 - registers "code_exec"
from tilt.verifiers import maths  # noqa: F401,E402 - registers "math_verify" and "format"
from tilt.verifiers import reasoning_gym_source  # noqa: F401,E402 - registers "reasoning_gym"
from tilt.verifiers import reward_model  # noqa: F401,E402 - registers "reward_model=<path>"
