"""tilt: post-train language models toward the reward-tilted reference policy."""
__version__ = "0.1.0"
