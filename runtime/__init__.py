"""Execution providers, deployment profiles and sessions.

    from onnxforge.runtime import session
    sess = session("model.onnx")                       # uses model.profile.json if present
    sess = session("model.onnx", profile="tuned.json") # or a given profile
"""
from .profile import Profile, ProviderEntry, default_profile, load_profile, profile_path_for, save_profile
from .session import make_runner, session

__all__ = [
    "Profile", "ProviderEntry", "default_profile", "load_profile", "profile_path_for", "save_profile",
    "make_runner", "session",
]
