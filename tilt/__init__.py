"""tilt: post-train language models toward the reward-tilted reference policy."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``tilt.train`` and ``tilt.sft`` (tilt.api), imported on first use so ``import tilt`` stays light."""
    if name in ("train", "sft"):
        from tilt import api

        return getattr(api, name)
    raise AttributeError(f"module 'tilt' has no attribute {name!r}")
