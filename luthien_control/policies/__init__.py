"""Control policies: the base class, the built-in policies, and loading a policy tree."""

from luthien_control.policies.base import Policy, PolicyConfig
from luthien_control.policies.loader import load_policy, load_policy_file

__all__ = ["Policy", "PolicyConfig", "load_policy", "load_policy_file"]
